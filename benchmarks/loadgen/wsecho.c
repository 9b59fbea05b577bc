/*
 * wsecho: the benchmark's WebSocket backend. Plain TCP on 127.0.0.1:PORT, one thread per
 * connection: answers an HTTP/1.1 upgrade (RFC 6455 accept key), then echoes every data frame
 * back unmasked with the same opcode and payload, answers a close with a close, and ignores
 * pings (the proxies under test do not send any). Fast enough that the TLS proxy in front of it,
 * not this backend, is what a WebSocket benchmark measures.
 *
 * Usage: wsecho PORT     Build: cc -O2 -Wall -Wextra -pthread -o wsecho wsecho.c -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

#define HEAD_MAX 8192
#define MAX_PAYLOAD (1 << 20)

static int read_full(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, (const char *)buf + put, n - put);
        if (w <= 0) return -1;
        put += (size_t)w;
    }
    return 0;
}

/* Reads the upgrade request head and answers 101; -1 if it is not a WebSocket upgrade. */
static int upgrade(int fd) {
    char head[HEAD_MAX + 1];
    size_t n = 0;
    while (n < 4 || memcmp(head + n - 4, "\r\n\r\n", 4) != 0) {
        if (n == HEAD_MAX) return -1;
        ssize_t r = read(fd, head + n, 1); /* byte by byte: nothing after the head is consumed */
        if (r <= 0) return -1;
        n++;
    }
    head[n] = 0;
    char *key = strcasestr(head, "\r\nSec-WebSocket-Key:");
    if (!key) {
        static const char bad[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        write_full(fd, bad, sizeof bad - 1);
        return -1;
    }
    key += strlen("\r\nSec-WebSocket-Key:");
    while (*key == ' ') key++;
    char *end = strstr(key, "\r\n");
    char material[256];
    int len = snprintf(material, sizeof material, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11",
                       (int)(end - key), key);
    if (len < 0 || (size_t)len >= sizeof material) return -1;
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)material, (size_t)len, digest);
    unsigned char accept[64];
    EVP_EncodeBlock(accept, digest, sizeof digest);
    char answer[256];
    len = snprintf(answer, sizeof answer,
                   "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Accept: %s\r\n\r\n",
                   accept);
    return write_full(fd, answer, (size_t)len);
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    unsigned char *payload = malloc(MAX_PAYLOAD + 14);
    if (!payload || upgrade(fd) < 0) goto done;
    for (;;) {
        unsigned char h[2];
        if (read_full(fd, h, 2) < 0) break;
        int opcode = h[0] & 0x0f, masked = h[1] & 0x80;
        uint64_t plen = h[1] & 0x7f;
        if (plen == 126) {
            unsigned char x[2];
            if (read_full(fd, x, 2) < 0) break;
            plen = ((uint64_t)x[0] << 8) | x[1];
        } else if (plen == 127) {
            unsigned char x[8];
            if (read_full(fd, x, 8) < 0) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | x[i];
        }
        if (plen > MAX_PAYLOAD) break;
        unsigned char mask[4] = {0, 0, 0, 0};
        if (masked && read_full(fd, mask, 4) < 0) break;
        /* the reply: header (at most 10 bytes) in front of the payload, in one write */
        size_t hl = plen < 126 ? 2 : plen < 65536 ? 4 : 10;
        unsigned char *out = payload + 14 - hl, *body = payload + 14;
        if (read_full(fd, body, plen) < 0) break;
        for (uint64_t i = 0; masked && i < plen; i++) body[i] ^= mask[i % 4];
        if (opcode == 0x9 || opcode == 0xA) continue; /* ping, pong */
        out[0] = (unsigned char)(0x80 | opcode);
        if (hl == 2) {
            out[1] = (unsigned char)plen;
        } else if (hl == 4) {
            out[1] = 126;
            out[2] = (unsigned char)(plen >> 8);
            out[3] = (unsigned char)plen;
        } else {
            out[1] = 127;
            for (int i = 0; i < 8; i++) out[2 + i] = (unsigned char)(plen >> (56 - 8 * i));
        }
        if (write_full(fd, out, hl + plen) < 0 || opcode == 0x8) break;
    }
done:
    free(payload);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535) {
        fprintf(stderr, "usage: wsecho PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1024) < 0) {
        perror("wsecho: bind/listen");
        return 1;
    }
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (pthread_create(&t, &attr, serve, (void *)(intptr_t)fd) != 0) close(fd);
        pthread_attr_destroy(&attr);
    }
}
