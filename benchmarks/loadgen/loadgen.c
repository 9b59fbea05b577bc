/*
 * loadgen: an HTTP/1.1- and HTTP/2-over-mutual-TLS load generator for benchmarking mtlsproxy against nginx.
 *
 * One thread, one epoll loop (edge-triggered, each socket registered once for IN|OUT), non-blocking
 * sockets driven by non-blocking OpenSSL state machines, one shared SSL_CTX. Every connection is a
 * small struct in a fixed array; the HTTP response parser is incremental and keeps only the head.
 *
 * Modes (one op = one request and its complete response, status 200 or it is an error):
 *   full       new TCP+TLS connection per op, full handshake, "Connection: close"
 *   resumed    like full, each connection slot resumes the session of its previous connection
 *   keepalive  --concurrency persistent connections, requests back to back on each
 *   latency    open loop: new connections at a fixed total --rate, latency from the scheduled start
 *   upload     keep-alive connections each POSTing --body-size bytes
 *   websocket  --concurrency connections, each upgraded once (GET --path, expects 101), then one op
 *              = one masked text frame of WS_PAYLOAD bytes and its echo back (unmasked, same length)
 *   h2         --concurrency persistent HTTP/2 connections (ALPN "h2" only), one GET stream at a time
 *              on each: one op = one request until its stream ends
 *
 * Output: one JSON object on stdout. Build: cc -O2 -Wall -Wextra -o loadgen loadgen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

enum { M_FULL, M_RESUMED, M_KEEPALIVE, M_LATENCY, M_UPLOAD, M_WEBSOCKET, M_H2, M_COUNT };
static const char *const MODE_NAMES[] = {"full", "resumed", "keepalive", "latency", "upload", "websocket", "h2"};

enum { S_FREE, S_BACKOFF, S_HANDSHAKE, S_WRITE, S_READ, S_DRAIN, S_H2 };

enum {
    P_HEAD, P_CL, P_CHUNK_SIZE, P_CHUNK_EXT, P_CHUNK_DATA, P_CHUNK_CRLF,
    P_TRAILER_START, P_TRAILER_LINE, P_EOF, P_DONE
};

#define HEAD_MAX 8192
#define MAX_EVENTS 256
#define TICK_NS 100000000ULL /* timeouts and restarts after errors are checked every 100 ms */
#define DRAIN_NS 2000000000ULL
#define GRACE_NS 2000000000ULL /* after the window: at most this long for ops in flight to end */
#define MAX_REASONS 5
#define WS_PAYLOAD 64 /* WebSocket mode: bytes of text per message */
#define CALL_BYTES (256 * 1024) /* fairness: a connection yields after this much I/O or one op */

typedef struct h2 h2_t;

typedef struct {
    int fd;
    uint32_t gen;
    uint32_t idx;
    int state;
    int op_open;  /* an op is in flight on this slot (not yet counted as done or error) */
    int measured; /* latency mode: the op was scheduled inside the measured window */
    SSL *ssl;
    SSL_SESSION *sess; /* resumed mode: the session of this slot's previous connection */
    uint64_t t_sched, t_connect, t_req, deadline;
    int queued;   /* on the run queue: it yielded while its socket was still ready */
    int done_in_call;    /* ops completed in the current drive() call */
    size_t io_in_call;   /* bytes moved in the current drive() call */
    int wphase; /* 0 request head, 1 body, 2 WebSocket frame */
    int ws;     /* WebSocket mode: the upgrade is done, ops are frames */
    size_t wsgot; /* bytes of the echoed frame read so far */
    size_t wpos;
    int pstate, status, chunked, conn_close, ndig, eof;
    uint64_t remaining;
    size_t hlen;
    h2_t *h2; /* h2 mode: the connection's HTTP/2 state */
    char head[HEAD_MAX];
} conn_t;

typedef struct {
    uint64_t *v;
    size_t n, cap;
} samples_t;

/* options */
static struct sockaddr_in g_addr;
static const char *g_sni = "localhost", *g_ca, *g_cert, *g_key, *g_path = "/";
static int g_mode = -1, g_concurrency = 32, g_concurrency_set = 0, g_tls_max = TLS1_3_VERSION;
static int g_tickets = 1, g_close_drain = 1;
static double g_duration = 5, g_warmup = 1, g_rate = 200, g_timeout = 10;
static size_t g_body_size = 1048576;

/* state */
static SSL_CTX *g_ctx;
static int g_epfd;
static conn_t *g_conns;
static uint32_t *g_free; /* latency mode: stack of free slots */
static size_t g_nfree;
static char *g_req;
static size_t g_req_len;
static char *g_body;
static char g_frame[6 + WS_PAYLOAD]; /* the client's masked text frame */
static const unsigned char WS_ECHO_HEAD[2] = {0x81, WS_PAYLOAD}; /* FIN + text, unmasked */
static uint64_t g_timeout_ns, g_t_start, g_t_warm, g_t_end;
static int g_counting, g_stopping;
static char g_rbuf[65536];
/* Connections that yielded with their socket still ready. Edge-triggered epoll will not report them
 * again, so the loop resumes them itself (a fast server must not let one connection starve others). */
static uint64_t *g_runq, *g_runq_work;
static size_t g_runq_n;

/* results */
static uint64_t r_ops, r_errors, r_handshakes, r_resumed, r_sent, r_recv, r_body_sent;
static uint64_t r_inflight_measured, r_drain_timeouts;
static samples_t r_lat, r_hs;
static int r_reasons;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void push(samples_t *s, uint64_t v) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) {
            perror("realloc");
            exit(1);
        }
    }
    s->v[s->n++] = v;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile, in microseconds */
static double pct(const samples_t *s, double q) {
    if (s->n == 0) return 0;
    size_t k = (size_t)(q * (double)s->n + 0.999999999);
    if (k < 1) k = 1;
    if (k > s->n) k = s->n;
    return (double)s->v[k - 1] / 1000.0;
}

/* is a result at time t (or of this op, in latency mode) inside the measured window? */
static int counts(const conn_t *c, uint64_t t) {
    if (g_mode == M_LATENCY) return c->measured;
    return t >= g_t_warm && t < g_t_end;
}

static void start_conn(conn_t *c, uint64_t sched);
static void drive(conn_t *c);

static void close_conn(conn_t *c) {
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->gen++; /* stale epoll events and run-queue entries for the old socket are ignored */
    c->queued = 0;
}

/* the slot has nothing to do: start the next op (closed loop) or return it to the pool */
static void slot_idle(conn_t *c) {
    if (g_mode == M_LATENCY) {
        c->state = S_FREE;
        g_free[g_nfree++] = c->idx;
    } else if (g_stopping) {
        c->state = S_FREE;
    } else {
        start_conn(c, 0);
    }
}

static void op_closed(conn_t *c) {
    if (c->op_open && c->measured) r_inflight_measured--;
    c->op_open = 0;
}

static void fail(conn_t *c, const char *what, int sslerr, int saved_errno) {
    uint64_t t = now_ns();
    if (c->op_open && counts(c, t)) r_errors++;
    if (r_reasons < MAX_REASONS) {
        char reason[256] = "";
        unsigned long e = ERR_peek_error();
        if (sslerr == SSL_ERROR_SSL || (sslerr == SSL_ERROR_SYSCALL && e)) {
            ERR_error_string_n(e, reason, sizeof reason);
        } else if (sslerr == SSL_ERROR_SYSCALL || sslerr == -1) {
            snprintf(reason, sizeof reason, "%s", saved_errno ? strerror(saved_errno) : "unexpected EOF");
        }
        long v = c->ssl ? SSL_get_verify_result(c->ssl) : X509_V_OK;
        fprintf(stderr, "loadgen: error: %s%s%s%s%s\n", what, reason[0] ? ": " : "", reason,
                v != X509_V_OK ? "; certificate verify: " : "",
                v != X509_V_OK ? X509_verify_cert_error_string(v) : "");
        if (++r_reasons == MAX_REASONS) fprintf(stderr, "loadgen: (further errors not shown)\n");
    }
    ERR_clear_error();
    op_closed(c);
    close_conn(c);
    if (g_mode == M_LATENCY) {
        slot_idle(c);
    } else {
        c->state = S_BACKOFF; /* restarted at the next tick, so a dead server is not hammered */
    }
}

static void ssl_fail(conn_t *c, int r, const char *what) {
    int saved = errno;
    int e = SSL_get_error(c->ssl, r);
    fail(c, what, e, saved);
}

static void reset_parser(conn_t *c) {
    c->pstate = P_HEAD;
    c->hlen = 0;
    c->status = 0;
    c->chunked = 0;
    c->conn_close = 0;
    c->remaining = 0;
    c->ndig = 0;
    c->eof = 0;
}

static void begin_request(conn_t *c, uint64_t t) {
    c->t_req = t;
    c->wsgot = 0;
    c->deadline = t + g_timeout_ns;
    c->wphase = 0;
    c->wpos = 0;
    reset_parser(c);
    c->state = S_WRITE;
}

static void start_conn(conn_t *c, uint64_t sched) {
    uint64_t t = now_ns();
    c->t_sched = sched;
    c->t_connect = t;
    c->deadline = t + g_timeout_ns;
    c->measured = g_mode == M_LATENCY && sched >= g_t_warm && sched < g_t_end;
    c->op_open = 1;
    if (c->measured) r_inflight_measured++;
    c->t_req = t;
    c->wphase = 0;
    c->wpos = 0;
    c->ws = 0;
    reset_parser(c);
    c->state = S_HANDSHAKE;

    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail(c, "socket", -1, errno);
        return;
    }
    c->fd = fd;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET};
    ev.data.u64 = ((uint64_t)c->idx << 32) | c->gen;
    if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        fail(c, "epoll_ctl", -1, errno);
        return;
    }
    c->ssl = SSL_new(g_ctx);
    if (!c->ssl || !SSL_set_fd(c->ssl, fd)) {
        fail(c, "SSL_new", SSL_ERROR_SSL, 0);
        return;
    }
    SSL_set_connect_state(c->ssl);
    struct in_addr tmp;
    if (inet_pton(AF_INET, g_sni, &tmp) != 1) SSL_set_tlsext_host_name(c->ssl, g_sni);
    if (g_mode == M_RESUMED && c->sess) SSL_set_session(c->ssl, c->sess);
    if (connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr) == 0) {
        drive(c);
    } else if (errno != EINPROGRESS) {
        fail(c, "connect", -1, errno);
    } /* else: the first epoll event (connected or refused) drives the handshake */
}

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* parse the response head in c->head; sets the body state; -1 on error */
static int parse_head(conn_t *c, const char **perr) {
    char *h = c->head;
    h[c->hlen] = 0;
    if (c->hlen < 12 || strncmp(h, "HTTP/1.", 7) != 0 || h[8] != ' ') {
        *perr = "malformed status line";
        return -1;
    }
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (h[i] < '0' || h[i] > '9') {
            *perr = "malformed status code";
            return -1;
        }
        status = status * 10 + (h[i] - '0');
    }
    int have_cl = 0, chunked = 0, conn_close = h[7] == '0';
    uint64_t cl = 0;
    char *line = strstr(h, "\r\n") + 2;
    char *end = h + c->hlen - 2;
    while (line < end) {
        char *eol = strstr(line, "\r\n");
        if (!eol) break;
        *eol = 0;
        char *colon = strchr(line, ':');
        if (colon) {
            size_t nlen = (size_t)(colon - line);
            char *v = colon + 1;
            while (*v == ' ' || *v == '\t') v++;
            if (nlen == 14 && strncasecmp(line, "content-length", 14) == 0) {
                char *stop;
                errno = 0;
                cl = strtoull(v, &stop, 10);
                if (errno || stop == v) {
                    *perr = "bad Content-Length";
                    return -1;
                }
                have_cl = 1;
            } else if (nlen == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
                if (strcasestr(v, "chunked")) chunked = 1;
            } else if (nlen == 10 && strncasecmp(line, "connection", 10) == 0) {
                if (strcasestr(v, "close")) conn_close = 1;
                else if (strcasestr(v, "keep-alive")) conn_close = 0;
            }
        }
        line = eol + 2;
    }
    if (status >= 100 && status < 200 && status != 101) { /* interim response: read the next head */
        c->hlen = 0;
        c->pstate = P_HEAD;
        return 0;
    }
    c->status = status;
    c->conn_close = conn_close;
    if (status == 204 || status == 304 || status == 101) {
        c->pstate = P_DONE;
    } else if (chunked) {
        c->pstate = P_CHUNK_SIZE;
        c->remaining = 0;
        c->ndig = 0;
    } else if (have_cl) {
        c->remaining = cl;
        c->pstate = cl ? P_CL : P_DONE;
    } else {
        c->pstate = P_EOF; /* body delimited by the end of the connection */
        c->conn_close = 1;
    }
    return 0;
}

/* feed response bytes; returns bytes consumed (up to the end of the response), -1 on error */
static ssize_t parse(conn_t *c, const char *p, size_t n, const char **perr) {
    size_t i = 0;
    while (i < n && c->pstate != P_DONE) {
        switch (c->pstate) {
        case P_HEAD: {
            size_t room = HEAD_MAX - 1 - c->hlen, take = n - i < room ? n - i : room;
            if (take == 0) {
                *perr = "response head too large";
                return -1;
            }
            size_t old = c->hlen, from = old >= 3 ? old - 3 : 0;
            memcpy(c->head + old, p + i, take);
            c->hlen += take;
            char *e = NULL;
            for (size_t j = from; j + 3 < c->hlen; j++) {
                if (c->head[j + 3] == '\n' && c->head[j] == '\r' && c->head[j + 1] == '\n' &&
                    c->head[j + 2] == '\r') {
                    e = c->head + j;
                    break;
                }
            }
            if (!e) {
                i += take;
                break;
            }
            size_t headlen = (size_t)(e - c->head) + 4;
            i += headlen - old;
            c->hlen = headlen;
            if (parse_head(c, perr) < 0) return -1;
            break;
        }
        case P_CL: {
            uint64_t take = n - i < c->remaining ? n - i : c->remaining;
            i += take;
            c->remaining -= take;
            if (c->remaining == 0) c->pstate = P_DONE;
            break;
        }
        case P_CHUNK_SIZE: {
            int ch = (unsigned char)p[i++], v = hexval(ch);
            if (v >= 0) {
                if (++c->ndig > 15) {
                    *perr = "chunk size too large";
                    return -1;
                }
                c->remaining = c->remaining * 16 + (uint64_t)v;
            } else if (ch == ';' || ch == ' ' || ch == '\t') {
                c->pstate = P_CHUNK_EXT;
            } else if (ch == '\r') {
                /* the LF follows */
            } else if (ch == '\n' && c->ndig) {
                c->pstate = c->remaining ? P_CHUNK_DATA : P_TRAILER_START;
            } else {
                *perr = "malformed chunk size";
                return -1;
            }
            break;
        }
        case P_CHUNK_EXT:
            if (p[i++] == '\n') c->pstate = c->remaining ? P_CHUNK_DATA : P_TRAILER_START;
            break;
        case P_CHUNK_DATA: {
            uint64_t take = n - i < c->remaining ? n - i : c->remaining;
            i += take;
            c->remaining -= take;
            if (c->remaining == 0) c->pstate = P_CHUNK_CRLF;
            break;
        }
        case P_CHUNK_CRLF: {
            char ch = p[i++];
            if (ch == '\n') {
                c->pstate = P_CHUNK_SIZE;
                c->ndig = 0;
            } else if (ch != '\r') {
                *perr = "missing CRLF after chunk";
                return -1;
            }
            break;
        }
        case P_TRAILER_START: {
            char ch = p[i++];
            if (ch == '\n') c->pstate = P_DONE;
            else if (ch != '\r') c->pstate = P_TRAILER_LINE;
            break;
        }
        case P_TRAILER_LINE:
            if (p[i++] == '\n') c->pstate = P_TRAILER_START;
            break;
        case P_EOF:
            i = n;
            break;
        }
    }
    return (ssize_t)i;
}

/* ---- HTTP/2 (mode h2) ----------------------------------------------------------------------------
 *
 * The client side of HTTP/2 that one stream at a time needs, and no more: the preface and an empty
 * SETTINGS, ACKs of the server's SETTINGS and PINGs, WINDOW_UPDATEs that give received DATA back to
 * the connection's and the stream's windows (once half of a window is used, so they never shut), and
 * an HPACK decoder. Requests are literals without indexing and without Huffman, so our encoder has no
 * state. The decoder has to read every response header block whole (static and dynamic table,
 * Huffman), because a server may add entries to the dynamic table in any of them (nginx does for
 * server, date, content-type and content-length) and index them later; of the fields it keeps only
 * :status. A PUSH_PROMISE, a RST_STREAM of the stream in flight or a GOAWAY ends the connection (an
 * error; the slot reconnects at the next tick). Stream ids 1, 3, 5, ...; the connection is closed
 * cleanly (GOAWAY, close_notify) before they run out.
 */

#define H2_FRAME_MAX 16384 /* SETTINGS_MAX_FRAME_SIZE: we keep the default */
#define H2_BLOCK_MAX 65536 /* a response header block (HEADERS + CONTINUATION), at most */
#define H2_ACK_AT 32768    /* WINDOW_UPDATE once half of the default window (65535) is used */
#define H2_LAST_SID 0x7ffffff0u
#define HPACK_TABLE 4096  /* SETTINGS_HEADER_TABLE_SIZE: we keep the default */
#define HPACK_ENTRIES 128 /* HPACK_TABLE / 32: the most entries a table of that size can hold */

enum { F_DATA, F_HEADERS, F_PRIORITY, F_RST_STREAM, F_SETTINGS, F_PUSH_PROMISE, F_PING, F_GOAWAY,
       F_WINDOW_UPDATE, F_CONTINUATION };
#define FL_END_STREAM 0x1
#define FL_ACK 0x1
#define FL_END_HEADERS 0x4
#define FL_PADDED 0x8
#define FL_PRIORITY 0x20

static const char H2_PREFACE[24] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

typedef struct {
    uint32_t size;  /* name + value + 32 (RFC 7541, 4.1) */
    uint32_t nlen;  /* the name's length */
    int status;     /* -1: the name is not :status; else its value as a number (0: not 3 digits) */
} hent_t;

struct h2 {
    /* the frame being read */
    uint8_t fh[9];
    size_t fhn;
    uint32_t flen, fgot, fsid;
    uint8_t ftype, fflags;
    uint8_t pl[H2_FRAME_MAX]; /* its payload (not kept for DATA, which is only counted) */
    /* the header block being read: HEADERS, then CONTINUATION until END_HEADERS */
    uint8_t *hb;
    size_t hbn;
    int in_block, block_end_stream;
    /* the connection */
    int got_settings;   /* the server's preface (its SETTINGS) came */
    int closing;        /* our GOAWAY is queued: close_notify once the output is written */
    uint32_t conn_used; /* DATA bytes not yet given back to the connection's window */
    /* the stream in flight */
    uint32_t sid, stream_used;
    int open, final, status;
    /* the HPACK dynamic table: a ring of n entries, the oldest at `first` */
    hent_t ent[HPACK_ENTRIES];
    unsigned first, n;
    uint32_t dsize, dmax;
    /* output not yet written */
    uint8_t *out;
    size_t ocap, olen, opos, otry; /* otry: the length of an SSL_write to retry, 0 if none */
};

/* RFC 7541 Appendix A: the static table's names; :status at 8-14 with these values */
static const char *const HPACK_STATIC[61] = {
    ":authority", ":method", ":method", ":path", ":path", ":scheme", ":scheme", ":status", ":status",
    ":status", ":status", ":status", ":status", ":status", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "accept", "access-control-allow-origin", "age", "allow",
    "authorization", "cache-control", "content-disposition", "content-encoding", "content-language",
    "content-length", "content-location", "content-range", "content-type", "cookie", "date", "etag",
    "expect", "expires", "from", "host", "if-match", "if-modified-since", "if-none-match", "if-range",
    "if-unmodified-since", "last-modified", "link", "location", "max-forwards", "proxy-authenticate",
    "proxy-authorization", "range", "referer", "refresh", "retry-after", "server", "set-cookie",
    "strict-transport-security", "transfer-encoding", "user-agent", "vary", "via", "www-authenticate"};
static const int HPACK_STATIC_STATUS[7] = {200, 204, 206, 304, 400, 404, 500};

/* RFC 7541 Appendix B. The code is canonical: codes of one length are consecutive and, length by
 * length, follow on from the shorter ones. So the number of codes of each length (1..30) and the
 * symbols in code order (256 is EOS) are the whole table. */
static const uint8_t HUFF_COUNT[31] = {0, 0, 0, 0, 0, 10, 26, 32, 6, 0, 5, 3, 2, 6, 2, 3,
                                       0, 0, 0, 3, 8, 13, 26, 29, 12, 4, 15, 19, 29, 0, 4};
static const uint16_t HUFF_SYM[257] = {
    48, 49, 50, 97, 99, 101, 105, 111, 115, 116, 32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61,
    65, 95, 98, 100, 102, 103, 104, 108, 109, 110, 112, 114, 117, 58, 66, 67, 68, 69, 70, 71, 72, 73,
    74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 89, 106, 107, 113, 118, 119, 120, 121, 122,
    38, 42, 44, 59, 88, 90, 33, 34, 40, 41, 63, 39, 43, 124, 35, 62, 0, 36, 64, 91, 93, 126, 94, 125,
    60, 96, 123, 92, 195, 208, 128, 130, 131, 162, 184, 194, 224, 226, 153, 161, 167, 172, 176, 177,
    179, 209, 216, 217, 227, 229, 230, 129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169,
    170, 173, 178, 181, 185, 186, 187, 189, 190, 196, 198, 228, 232, 233, 1, 135, 137, 138, 139, 140,
    141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166, 168, 174, 175, 180, 182, 183, 188, 191,
    197, 231, 239, 9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237, 199, 207, 234, 235, 192,
    193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255, 203, 204, 211, 212, 214, 221,
    222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252, 253, 254, 2, 3, 4, 5, 6, 7, 8, 11, 12, 14,
    15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 30, 31, 127, 220, 249, 10, 13, 22, 256};
static uint32_t huff_first[31]; /* the first code of each length */
static uint16_t huff_off[31];   /* where that length's symbols start in HUFF_SYM */

static void huff_init(void) {
    uint32_t code = 0;
    uint16_t off = 0;
    for (int len = 1; len <= 30; len++) {
        huff_first[len] = code;
        huff_off[len] = off;
        code = (code + HUFF_COUNT[len]) << 1;
        off = (uint16_t)(off + HUFF_COUNT[len]);
    }
}

/* decode n Huffman-coded bytes: the decoded length in *len, the first `cap` bytes in out */
static int huff_decode(const uint8_t *p, size_t n, uint8_t *out, size_t cap, size_t *len) {
    uint32_t code = 0;
    int bits = 0;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        for (int b = 7; b >= 0; b--) {
            code = code << 1 | ((p[i] >> b) & 1u);
            bits++;
            if (code - huff_first[bits] < HUFF_COUNT[bits]) {
                unsigned sym = HUFF_SYM[huff_off[bits] + code - huff_first[bits]];
                if (sym == 256) return -1; /* EOS inside a string */
                if (k < cap) out[k] = (uint8_t)sym;
                k++;
                code = 0;
                bits = 0;
            } else if (bits == 30) {
                return -1;
            }
        }
    }
    if (bits > 7 || code != (1u << bits) - 1) return -1; /* padding: under 8 bits of EOS (ones) */
    *len = k;
    return 0;
}

/* an HPACK integer with an N-bit prefix (RFC 7541, 5.1) */
static int hp_int(const uint8_t **pp, const uint8_t *end, int prefix, uint32_t *v) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    uint32_t max = (1u << prefix) - 1, x = *p++ & max;
    if (x == max) {
        int shift = 0;
        uint8_t b;
        do {
            if (p >= end || shift > 21) return -1;
            b = *p++;
            x += (uint32_t)(b & 0x7f) << shift;
            shift += 7;
        } while (b & 0x80);
    }
    *pp = p;
    *v = x;
    return 0;
}

/* an HPACK string (RFC 7541, 5.2): its decoded length in *len and its first `cap` bytes in out; with
 * need == 0 it is only skipped (*len is then not set) */
static int hp_string(const uint8_t **pp, const uint8_t *end, uint8_t *out, size_t cap, size_t *len,
                     int need) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    int huffman = *p & 0x80;
    uint32_t n;
    if (hp_int(&p, end, 7, &n) < 0 || n > (size_t)(end - p)) return -1;
    if (need) {
        if (huffman) {
            if (huff_decode(p, n, out, cap, len) < 0) return -1;
        } else {
            memcpy(out, p, n < cap ? n : cap);
            *len = n;
        }
    }
    *pp = p + n;
    return 0;
}

/* table entry idx (1-based, static then dynamic): its :status value (or -1) and name length */
static int hp_entry(const h2_t *h, uint32_t idx, int *status, uint32_t *nlen) {
    if (idx >= 1 && idx <= 61) {
        *status = idx >= 8 && idx <= 14 ? HPACK_STATIC_STATUS[idx - 8] : -1;
        *nlen = (uint32_t)strlen(HPACK_STATIC[idx - 1]);
        return 0;
    }
    if (idx < 62 || idx - 62 >= h->n) return -1;
    const hent_t *e = &h->ent[(h->first + h->n - 1 - (idx - 62)) % HPACK_ENTRIES];
    *status = e->status;
    *nlen = e->nlen;
    return 0;
}

static void hp_evict(h2_t *h, uint32_t room) {
    while (h->n && h->dsize + room > h->dmax) {
        h->dsize -= h->ent[h->first].size;
        h->first = (h->first + 1) % HPACK_ENTRIES;
        h->n--;
    }
}

static void hp_insert(h2_t *h, uint32_t nlen, uint32_t vlen, int status) {
    uint32_t size = nlen + vlen + 32;
    if (size > h->dmax) { /* larger than the table: it empties the table (RFC 7541, 4.4) */
        h->n = 0;
        h->dsize = 0;
        return;
    }
    hp_evict(h, size);
    hent_t *e = &h->ent[(h->first + h->n) % HPACK_ENTRIES];
    e->size = size;
    e->nlen = nlen;
    e->status = status;
    h->n++;
    h->dsize += size;
}

static int status_of(const uint8_t *v, size_t len) {
    if (len != 3) return 0;
    for (int i = 0; i < 3; i++)
        if (v[i] < '0' || v[i] > '9') return 0;
    return (v[0] - '0') * 100 + (v[1] - '0') * 10 + (v[2] - '0');
}

/* decode a whole response header block; *status: its :status, 0 if it has none */
static int hp_block(h2_t *h, const uint8_t *p, size_t n, int *status, const char **perr) {
    const uint8_t *end = p + n;
    int first = 1; /* table size updates come only at the start of a block */
    *status = 0;
    *perr = "malformed HPACK header block";
    while (p < end) {
        uint8_t b = *p;
        uint32_t idx, nlen;
        int st;
        if ((b & 0xe0) == 0x20) { /* dynamic table size update */
            uint32_t size;
            if (!first || hp_int(&p, end, 5, &size) < 0 || size > HPACK_TABLE) return -1;
            h->dmax = size;
            hp_evict(h, 0);
            continue;
        }
        first = 0;
        if (b & 0x80) { /* indexed field */
            if (hp_int(&p, end, 7, &idx) < 0) return -1;
            if (hp_entry(h, idx, &st, &nlen) < 0) {
                *perr = "HPACK index not in the table";
                return -1;
            }
        } else { /* a literal, with incremental indexing (01), without (0000) or never indexed (0001) */
            int indexing = (b & 0xc0) == 0x40;
            if (hp_int(&p, end, indexing ? 6 : 4, &idx) < 0) return -1;
            if (idx == 0) { /* a new name */
                uint8_t name[8];
                size_t len;
                if (hp_string(&p, end, name, sizeof name, &len, 1) < 0) return -1;
                nlen = (uint32_t)len;
                st = len == 7 && memcmp(name, ":status", 7) == 0 ? 0 : -1;
            } else if (hp_entry(h, idx, &st, &nlen) < 0) {
                *perr = "HPACK index not in the table";
                return -1;
            }
            int is_status = st >= 0;
            uint8_t value[4];
            size_t vlen = 0;
            if (hp_string(&p, end, value, sizeof value, &vlen, indexing || is_status) < 0) return -1;
            if (is_status) st = status_of(value, vlen);
            if (indexing) hp_insert(h, nlen, (uint32_t)vlen, st);
        }
        if (st >= 0) { /* a :status field */
            if (st == 0 || *status) {
                *perr = st ? "two :status fields" : "malformed :status";
                return -1;
            }
            *status = st;
        }
    }
    return 0;
}

static int h2_out(h2_t *h, const void *p, size_t n) {
    if (h->olen + n > h->ocap && h->opos) { /* the contents stay: SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER */
        memmove(h->out, h->out + h->opos, h->olen - h->opos);
        h->olen -= h->opos;
        h->opos = 0;
    }
    if (h->olen + n > h->ocap) return -1;
    if (n) memcpy(h->out + h->olen, p, n);
    h->olen += n;
    return 0;
}

static int h2_frame(h2_t *h, int type, int flags, uint32_t sid, const void *payload, size_t len) {
    uint8_t fh[9] = {(uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len, (uint8_t)type,
                     (uint8_t)flags, (uint8_t)((sid >> 24) & 0x7f), (uint8_t)(sid >> 16),
                     (uint8_t)(sid >> 8), (uint8_t)sid};
    return h2_out(h, fh, 9) < 0 || h2_out(h, payload, len) < 0 ? -1 : 0;
}

static int h2_u32_frame(h2_t *h, int type, uint32_t sid, uint32_t a, uint32_t b, size_t len) {
    uint8_t p[8] = {(uint8_t)(a >> 24), (uint8_t)(a >> 16), (uint8_t)(a >> 8), (uint8_t)a,
                    (uint8_t)(b >> 24), (uint8_t)(b >> 16), (uint8_t)(b >> 8), (uint8_t)b};
    return h2_frame(h, type, 0, sid, p, len);
}

/* queue the next request: a new stream, HEADERS with END_STREAM | END_HEADERS */
static int h2_request(conn_t *c, uint64_t t) {
    h2_t *h = c->h2;
    h->sid = h->sid ? h->sid + 2 : 1;
    h->open = 1;
    h->final = 0;
    h->status = 0;
    h->stream_used = 0;
    c->t_req = t;
    c->deadline = t + g_timeout_ns;
    if (h2_frame(h, F_HEADERS, FL_END_STREAM | FL_END_HEADERS, h->sid, g_req, g_req_len) < 0) {
        fail(c, "HTTP/2 output backlog full", 0, 0);
        return -1;
    }
    return 0;
}

/* after the handshake: check ALPN, then the preface, an empty SETTINGS and the first request */
static int h2_start(conn_t *c, uint64_t t) {
    const unsigned char *alpn = NULL;
    unsigned alen = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alen);
    if (alen != 2 || memcmp(alpn, "h2", 2) != 0) {
        fprintf(stderr, "loadgen: the server did not select h2 in ALPN (%s%.*s%s); --mode h2 needs it\n",
                alen ? "it selected \"" : "no ALPN protocol selected", (int)alen, alen ? (const char *)alpn : "",
                alen ? "\"" : "");
        exit(1);
    }
    h2_t *h = c->h2;
    uint8_t *hb = h->hb, *out = h->out;
    size_t ocap = h->ocap;
    memset(h, 0, sizeof *h);
    h->hb = hb;
    h->out = out;
    h->ocap = ocap;
    h->dmax = HPACK_TABLE;
    c->state = S_H2;
    if (h2_out(h, H2_PREFACE, sizeof H2_PREFACE) < 0 || h2_frame(h, F_SETTINGS, 0, 0, NULL, 0) < 0) {
        fail(c, "HTTP/2 output backlog full", 0, 0);
        return -1;
    }
    return h2_request(c, t);
}

static int op_done(conn_t *c);

/* the stream in flight ended; 1: the connection is gone (op_done failed it) */
static int h2_stream_end(conn_t *c) {
    c->h2->open = 0;
    c->status = c->h2->status;
    if (!op_done(c)) return 1;
    c->done_in_call++;
    return 0;
}

static int h2_block_done(conn_t *c, const char **perr) {
    h2_t *h = c->h2;
    int status;
    h->in_block = 0;
    if (hp_block(h, h->hb, h->hbn, &status, perr) < 0) return -1;
    if (!h->final) {
        if (status == 0) {
            *perr = "response HEADERS without :status";
            return -1;
        }
        if (status < 200) { /* interim (1xx): the response head follows */
            if (h->block_end_stream) {
                *perr = "an interim response ended the stream";
                return -1;
            }
            return 0;
        }
        h->final = 1;
        h->status = status;
    } /* else trailers: decoded for the table only */
    return h->block_end_stream ? h2_stream_end(c) : 0;
}

static int h2_append_block(h2_t *h, const uint8_t *p, size_t n, const char **perr) {
    if (h->hbn + n > H2_BLOCK_MAX) {
        *perr = "response header block too large";
        return -1;
    }
    memcpy(h->hb + h->hbn, p, n);
    h->hbn += n;
    return 0;
}

/* a whole frame was read; 0: go on, -1: an error (*perr), 1: the connection is gone */
static int h2_on_frame(conn_t *c, const char **perr) {
    static char reason[160];
    h2_t *h = c->h2;
    const uint8_t *pl = h->pl;
    uint32_t len = h->flen, sid = h->fsid;
    uint8_t fl = h->fflags;
    *perr = "malformed HTTP/2 frame";
    if (!h->got_settings && (h->ftype != F_SETTINGS || (fl & FL_ACK))) {
        *perr = "the server's first frame is not SETTINGS";
        return -1;
    }
    if (h->in_block && h->ftype != F_CONTINUATION) {
        *perr = "a frame inside a header block";
        return -1;
    }
    switch (h->ftype) {
    case F_DATA:
        if (sid == 0) return -1;
        h->conn_used += len;
        if (h->conn_used >= H2_ACK_AT) {
            if (h2_u32_frame(h, F_WINDOW_UPDATE, 0, h->conn_used, 0, 4) < 0) goto full;
            h->conn_used = 0;
        }
        if (sid != h->sid || !h->open) return 0; /* a stream that ended: only the connection counts */
        if (!h->final) {
            *perr = "DATA before the response head";
            return -1;
        }
        if (fl & FL_END_STREAM) return h2_stream_end(c);
        h->stream_used += len;
        if (h->stream_used >= H2_ACK_AT) {
            if (h2_u32_frame(h, F_WINDOW_UPDATE, sid, h->stream_used, 0, 4) < 0) goto full;
            h->stream_used = 0;
        }
        return 0;
    case F_HEADERS: {
        size_t off = 0, end = len;
        if (fl & FL_PADDED) {
            if (len < 1 || pl[0] >= len) return -1;
            end -= pl[0];
            off = 1;
        }
        if (fl & FL_PRIORITY) off += 5;
        if (off > end) return -1;
        if (sid != h->sid || !h->open) {
            *perr = "HEADERS on a stream that is not the one in flight";
            return -1;
        }
        h->hbn = 0;
        h->in_block = 1;
        h->block_end_stream = fl & FL_END_STREAM;
        if (h2_append_block(h, pl + off, end - off, perr) < 0) return -1;
        return fl & FL_END_HEADERS ? h2_block_done(c, perr) : 0;
    }
    case F_CONTINUATION:
        if (!h->in_block || sid != h->sid) {
            *perr = "CONTINUATION without HEADERS";
            return -1;
        }
        if (h2_append_block(h, pl, len, perr) < 0) return -1;
        return fl & FL_END_HEADERS ? h2_block_done(c, perr) : 0;
    case F_RST_STREAM:
        if (len != 4 || sid == 0) return -1;
        if (sid != h->sid || !h->open) return 0;
        snprintf(reason, sizeof reason, "RST_STREAM from the server (error code 0x%x)",
                 (unsigned)pl[0] << 24 | (unsigned)pl[1] << 16 | (unsigned)pl[2] << 8 | pl[3]);
        fail(c, reason, 0, 0);
        return 1;
    case F_SETTINGS:
        if (sid != 0) return -1;
        if (fl & FL_ACK) return len ? -1 : 0;
        if (len % 6) return -1;
        h->got_settings = 1;
        if (h2_frame(h, F_SETTINGS, FL_ACK, 0, NULL, 0) < 0) goto full;
        return 0;
    case F_PUSH_PROMISE:
        *perr = "PUSH_PROMISE: loadgen does not take server push";
        return -1;
    case F_PING:
        if (len != 8 || sid != 0) return -1;
        if (!(fl & FL_ACK) && h2_frame(h, F_PING, FL_ACK, 0, pl, 8) < 0) goto full;
        return 0;
    case F_GOAWAY: {
        if (len < 8 || sid != 0) return -1;
        unsigned code = (unsigned)pl[4] << 24 | (unsigned)pl[5] << 16 | (unsigned)pl[6] << 8 | pl[7];
        char debug[64];
        size_t k = 0;
        for (uint32_t i = 8; i < len && k < sizeof debug - 1; i++)
            debug[k++] = pl[i] >= 0x20 && pl[i] < 0x7f ? (char)pl[i] : '?';
        debug[k] = 0;
        snprintf(reason, sizeof reason, "GOAWAY from the server (error code 0x%x%s%s)", code,
                 k ? ": " : "", debug);
        fail(c, reason, 0, 0);
        return 1;
    }
    default: /* PRIORITY, WINDOW_UPDATE (we send no DATA), extension frames */
        return 0;
    }
full:
    *perr = "HTTP/2 output backlog full";
    return -1;
}

/* received bytes to the frame reader; 0: go on, -1: an error (*perr), 1: the connection is gone */
static int h2_feed(conn_t *c, const uint8_t *p, size_t n, const char **perr) {
    h2_t *h = c->h2;
    while (n) {
        if (h->fhn < 9) {
            size_t take = 9 - h->fhn < n ? 9 - h->fhn : n;
            memcpy(h->fh + h->fhn, p, take);
            h->fhn += take;
            p += take;
            n -= take;
            if (h->fhn < 9) break;
            const uint8_t *fh = h->fh;
            h->flen = (uint32_t)fh[0] << 16 | (uint32_t)fh[1] << 8 | fh[2];
            h->ftype = fh[3];
            h->fflags = fh[4];
            h->fsid = (uint32_t)(fh[5] & 0x7f) << 24 | (uint32_t)fh[6] << 16 | (uint32_t)fh[7] << 8 | fh[8];
            h->fgot = 0;
            if (h->flen > H2_FRAME_MAX) {
                *perr = "a frame larger than SETTINGS_MAX_FRAME_SIZE";
                return -1;
            }
        } else {
            size_t take = h->flen - h->fgot < n ? h->flen - h->fgot : n;
            if (h->ftype != F_DATA) memcpy(h->pl + h->fgot, p, take);
            h->fgot += (uint32_t)take;
            p += take;
            n -= take;
        }
        if (h->fgot == h->flen) {
            h->fhn = 0;
            int r = h2_on_frame(c, perr);
            if (r) return r;
        }
    }
    return 0;
}

/* the request's header block: literals without indexing (indexed names), no Huffman */
static size_t hp_put_string(uint8_t *p, const char *s) {
    size_t n = strlen(s), k = 0;
    if (n < 127) {
        p[k++] = (uint8_t)n;
    } else {
        p[k++] = 127;
        size_t rest = n - 127;
        while (rest >= 128) {
            p[k++] = (uint8_t)(0x80 | (rest & 0x7f));
            rest >>= 7;
        }
        p[k++] = (uint8_t)rest;
    }
    memcpy(p + k, s, n);
    return k + n;
}

static size_t h2_request_block(uint8_t *out, size_t cap) {
    /* static table name indices: :method 2, :scheme 6, :path 4, :authority 1 */
    const struct { uint8_t idx; const char *value; } fields[] = {
        {2, "GET"}, {6, "https"}, {4, g_path}, {1, g_sni}};
    size_t k = 0;
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        if (k + 1 + 6 + strlen(fields[i].value) > cap) return 0;
        out[k++] = fields[i].idx; /* 0000 + a 4-bit name index: literal without indexing */
        k += hp_put_string(out + k, fields[i].value);
    }
    return k;
}

/* the response is complete; returns 1 if the connection goes on with the next request */
static int op_done(conn_t *c) {
    uint64_t t = now_ns();
    if (g_mode == M_WEBSOCKET && !c->ws) { /* the upgrade: not an op, the frames are */
        if (c->status != 101) {
            char what[64];
            snprintf(what, sizeof what, "HTTP status %d to the WebSocket upgrade", c->status);
            fail(c, what, 0, 0);
            return 0;
        }
        c->ws = 1;
        begin_request(c, t);
        c->wphase = 2;
        return 1;
    }
    if (g_mode != M_WEBSOCKET && c->status != 200) {
        char what[64];
        snprintf(what, sizeof what, "HTTP status %d", c->status);
        fail(c, what, 0, 0);
        return 0;
    }
    if (counts(c, t)) {
        r_ops++;
        uint64_t start = g_mode == M_LATENCY ? c->t_sched
                         : (g_mode == M_FULL || g_mode == M_RESUMED) ? c->t_connect
                                                                        : c->t_req;
        push(&r_lat, t - start);
    }
    op_closed(c);
    if (g_mode == M_RESUMED) {
        SSL_SESSION *s = SSL_get1_session(c->ssl); /* after the response: TLS 1.3 tickets arrived */
        if (s && SSL_SESSION_is_resumable(s)) {
            if (c->sess) SSL_SESSION_free(c->sess);
            c->sess = s;
        } else if (s) {
            SSL_SESSION_free(s);
        }
    }
    if (g_mode == M_H2) {
        if (!g_stopping && c->h2->sid < H2_LAST_SID) {
            c->op_open = 1;
            return h2_request(c, t) == 0;
        }
        /* the window ended (or stream ids run out): GOAWAY, then close_notify once it is written */
        if (h2_u32_frame(c->h2, F_GOAWAY, 0, 0, 0, 8) < 0) {
            fail(c, "HTTP/2 output backlog full", 0, 0);
            return 0;
        }
        c->h2->closing = 1;
        return 1;
    }
    if ((g_mode == M_KEEPALIVE || g_mode == M_UPLOAD) && !c->conn_close && !g_stopping) {
        c->op_open = 1;
        begin_request(c, t);
        return 1;
    }
    if (g_mode == M_WEBSOCKET && !g_stopping) {
        c->op_open = 1;
        begin_request(c, t);
        c->wphase = 2;
        return 1;
    }
    if (c->eof || !g_close_drain) { /* the server already closed, or --close fast */
        if (!c->eof) SSL_shutdown(c->ssl);
        close_conn(c);
        slot_idle(c);
        return 0;
    }
    /* send our close_notify, then wait for the server's close before closing (no RST either way) */
    SSL_shutdown(c->ssl);
    ERR_clear_error();
    c->state = S_DRAIN;
    c->deadline = t + DRAIN_NS;
    return 1;
}

static void drive(conn_t *c) {
    c->done_in_call = 0;
    c->io_in_call = 0;
    for (;;) {
        if (c->done_in_call > 1 || c->io_in_call >= CALL_BYTES) {
            if (!c->queued) {
                c->queued = 1;
                g_runq[g_runq_n++] = ((uint64_t)c->idx << 32) | c->gen;
            }
            return;
        }
        switch (c->state) {
        case S_HANDSHAKE: {
            int r = SSL_do_handshake(c->ssl);
            if (r != 1) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
                if (g_mode == M_H2 && e == SSL_ERROR_SSL &&
                    ERR_GET_REASON(ERR_peek_error()) == SSL_R_TLSV1_ALERT_NO_APPLICATION_PROTOCOL) {
                    fprintf(stderr, "loadgen: the server refused ALPN h2 (alert no_application_protocol); "
                                    "--mode h2 needs a server that selects h2\n");
                    exit(1);
                }
                ssl_fail(c, r, "handshake");
                return;
            }
            uint64_t t = now_ns();
            if (counts(c, t)) {
                r_handshakes++;
                push(&r_hs, t - c->t_connect);
                if (SSL_session_reused(c->ssl)) r_resumed++;
            }
            if (g_mode == M_H2) {
                if (h2_start(c, t) < 0) return; /* the op starts with its request, as keep-alive's */
            } else if (g_mode == M_KEEPALIVE || g_mode == M_UPLOAD || g_mode == M_WEBSOCKET) {
                begin_request(c, t); /* a keep-alive op starts with its request */
            } else {
                uint64_t deadline = c->deadline; /* the op includes the connection */
                begin_request(c, c->t_connect);
                c->deadline = deadline;
            }
            break;
        }
        case S_WRITE: {
            const char *p;
            size_t len;
            if (c->wphase == 0) {
                p = g_req + c->wpos;
                len = g_req_len - c->wpos;
            } else if (c->wphase == 2) {
                p = g_frame + c->wpos;
                len = sizeof g_frame - c->wpos;
            } else {
                p = g_body + c->wpos;
                len = g_body_size - c->wpos;
            }
            if (len == 0) {
                if (c->wphase == 0 && g_mode == M_UPLOAD && g_body_size > 0) {
                    c->wphase = 1;
                    c->wpos = 0;
                } else {
                    c->state = S_READ;
                }
                break;
            }
            size_t w;
            int r = SSL_write_ex(c->ssl, p, len, &w);
            if (r != 1) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
                ssl_fail(c, r, "write");
                return;
            }
            c->wpos += w;
            c->io_in_call += w;
            if (g_counting) {
                r_sent += w;
                if (c->wphase == 1) r_body_sent += w;
            }
            break;
        }
        case S_READ: {
            size_t n;
            int r = SSL_read_ex(c->ssl, g_rbuf, sizeof g_rbuf, &n);
            if (r != 1) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
                if (e == SSL_ERROR_ZERO_RETURN && c->pstate == P_EOF) {
                    c->pstate = P_DONE;
                    c->eof = 1;
                    op_done(c);
                    return;
                }
                if (e == SSL_ERROR_ZERO_RETURN) {
                    fail(c, c->pstate == P_HEAD && c->hlen == 0
                                ? "connection closed before a response"
                                : "connection closed inside the response",
                         0, 0);
                    return;
                }
                ssl_fail(c, r, "read");
                return;
            }
            if (g_counting) r_recv += n;
            c->io_in_call += n;
            if (c->ws) { /* the echo of our frame: exactly 2 + WS_PAYLOAD bytes, then the next op */
                size_t want = 2 + WS_PAYLOAD - c->wsgot;
                if (n > want) {
                    fail(c, "unexpected bytes after the echoed frame", 0, 0);
                    return;
                }
                for (size_t i = 0; i < n && c->wsgot + i < 2; i++) {
                    if ((unsigned char)g_rbuf[i] != WS_ECHO_HEAD[c->wsgot + i]) {
                        fail(c, "the echo is not an unmasked text frame of the sent length", 0, 0);
                        return;
                    }
                }
                c->wsgot += n;
                if (c->wsgot < 2 + WS_PAYLOAD) break;
                c->status = 200;
                if (!op_done(c)) return;
                c->done_in_call++;
                break;
            }
            const char *perr = "";
            ssize_t used = parse(c, g_rbuf, n, &perr);
            if (used < 0) {
                fail(c, perr, 0, 0);
                return;
            }
            if (c->pstate == P_DONE) {
                if ((size_t)used != n) {
                    fail(c, "unexpected bytes after the response", 0, 0);
                    return;
                }
                if (!op_done(c)) return;
                c->done_in_call++;
            }
            break;
        }
        case S_H2: {
            h2_t *h = c->h2;
            if (h->opos < h->olen) { /* write what is queued before reading more */
                size_t len = h->otry ? h->otry : h->olen - h->opos, w;
                int r = SSL_write_ex(c->ssl, h->out + h->opos, len, &w);
                if (r != 1) {
                    int e = SSL_get_error(c->ssl, r);
                    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                        h->otry = len; /* retried with the same length */
                        return;
                    }
                    ssl_fail(c, r, "write");
                    return;
                }
                h->otry = 0;
                h->opos += w;
                if (h->opos == h->olen) h->opos = h->olen = 0;
                c->io_in_call += w;
                if (g_counting) r_sent += w;
                break;
            }
            if (h->closing) { /* our GOAWAY is out: close_notify, then wait for the server's close */
                SSL_shutdown(c->ssl);
                ERR_clear_error();
                c->state = S_DRAIN;
                c->deadline = now_ns() + DRAIN_NS;
                break;
            }
            size_t n;
            int r = SSL_read_ex(c->ssl, g_rbuf, sizeof g_rbuf, &n);
            if (r != 1) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
                if (e == SSL_ERROR_ZERO_RETURN) {
                    fail(c, "connection closed by the server", 0, 0);
                    return;
                }
                ssl_fail(c, r, "read");
                return;
            }
            if (g_counting) r_recv += n;
            c->io_in_call += n;
            const char *perr = "";
            int f = h2_feed(c, (const uint8_t *)g_rbuf, n, &perr);
            if (f < 0) fail(c, perr, 0, 0);
            if (f) return;
            break;
        }
        case S_DRAIN: {
            size_t n;
            int r = SSL_read_ex(c->ssl, g_rbuf, sizeof g_rbuf, &n);
            if (r == 1) {
                c->io_in_call += n;
                break;
            }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
            ERR_clear_error(); /* close_notify, EOF or a reset: the server is done */
            close_conn(c);
            slot_idle(c);
            return;
        }
        default:
            return;
        }
    }
}

static void tick(uint64_t t) {
    for (int i = 0; i < g_concurrency; i++) {
        conn_t *c = &g_conns[i];
        if (c->state == S_BACKOFF) {
            if (g_stopping) c->state = S_FREE;
            else start_conn(c, 0);
        } else if (c->state >= S_HANDSHAKE && t > c->deadline) {
            if (c->state == S_DRAIN) {
                if (!r_drain_timeouts++)
                    fprintf(stderr, "loadgen: note: server did not close after Connection: close\n");
                close_conn(c);
                slot_idle(c);
            } else {
                fail(c, "timeout", 0, 0);
            }
        }
    }
}

static void usage(const char *msg) {
    if (msg) fprintf(stderr, "loadgen: %s\n", msg);
    fprintf(stderr,
            "usage: loadgen --connect HOST:PORT --ca CA.pem --cert CLIENT.pem --key CLIENT.key\n"
            "               --mode full|resumed|keepalive|latency|upload|websocket|h2 [--sni localhost]\n"
            "               [--concurrency 32] [--duration 5] [--warmup 1] [--rate 200]\n"
            "               [--path /] [--body-size 1048576] [--tls-max 1.3|1.2] [--tickets on|off]\n"
            "               [--timeout 10] [--close drain|fast]\n");
    exit(2);
}

static double num_arg(const char *name, const char *v, double lo) {
    char *end;
    double d = strtod(v, &end);
    if (end == v || *end || d < lo) {
        fprintf(stderr, "loadgen: --%s: bad value '%s'\n", name, v);
        usage(NULL);
    }
    return d;
}

static void parse_args(int argc, char **argv) {
    static const struct option opts[] = {
        {"connect", required_argument, 0, 'c'},   {"sni", required_argument, 0, 's'},
        {"ca", required_argument, 0, 'A'},        {"cert", required_argument, 0, 'C'},
        {"key", required_argument, 0, 'K'},       {"mode", required_argument, 0, 'm'},
        {"concurrency", required_argument, 0, 'n'}, {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'w'},    {"rate", required_argument, 0, 'r'},
        {"path", required_argument, 0, 'p'},      {"body-size", required_argument, 0, 'b'},
        {"tls-max", required_argument, 0, 'T'},   {"tickets", required_argument, 0, 't'},
        {"timeout", required_argument, 0, 'o'},   {"close", required_argument, 0, 'x'},
        {"help", no_argument, 0, 'h'},            {0, 0, 0, 0}};
    const char *connect_to = NULL;
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': connect_to = optarg; break;
        case 's': g_sni = optarg; break;
        case 'A': g_ca = optarg; break;
        case 'C': g_cert = optarg; break;
        case 'K': g_key = optarg; break;
        case 'm':
            for (int i = 0; i < M_COUNT; i++)
                if (strcmp(optarg, MODE_NAMES[i]) == 0) g_mode = i;
            if (g_mode < 0) usage("--mode must be full, resumed, keepalive, latency, upload, websocket or h2");
            break;
        case 'n':
            g_concurrency = (int)num_arg("concurrency", optarg, 1);
            g_concurrency_set = 1;
            break;
        case 'd': g_duration = num_arg("duration", optarg, 0.001); break;
        case 'w': g_warmup = num_arg("warmup", optarg, 0); break;
        case 'r': g_rate = num_arg("rate", optarg, 0.001); break;
        case 'p': g_path = optarg; break;
        case 'b': g_body_size = (size_t)num_arg("body-size", optarg, 0); break;
        case 'o': g_timeout = num_arg("timeout", optarg, 0.001); break;
        case 'T':
            if (strcmp(optarg, "1.3") == 0) g_tls_max = TLS1_3_VERSION;
            else if (strcmp(optarg, "1.2") == 0) g_tls_max = TLS1_2_VERSION;
            else usage("--tls-max must be 1.3 or 1.2");
            break;
        case 't':
            if (strcmp(optarg, "on") == 0) g_tickets = 1;
            else if (strcmp(optarg, "off") == 0) g_tickets = 0;
            else usage("--tickets must be on or off");
            break;
        case 'x':
            if (strcmp(optarg, "drain") == 0) g_close_drain = 1;
            else if (strcmp(optarg, "fast") == 0) g_close_drain = 0;
            else usage("--close must be drain or fast");
            break;
        default: usage(NULL);
        }
    }
    if (optind != argc) usage("unexpected positional argument");
    if (!connect_to || !g_ca || !g_cert || !g_key || g_mode < 0)
        usage("--connect, --ca, --cert, --key and --mode are required");
    char host[256];
    const char *colon = strrchr(connect_to, ':');
    if (!colon || (size_t)(colon - connect_to) >= sizeof host) usage("--connect must be HOST:PORT");
    memcpy(host, connect_to, (size_t)(colon - connect_to));
    host[colon - connect_to] = 0;
    int port = atoi(colon + 1);
    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (strcmp(host, "localhost") == 0) strcpy(host, "127.0.0.1");
    if (port <= 0 || port > 65535 || inet_pton(AF_INET, host, &g_addr.sin_addr) != 1)
        usage("--connect must be IPv4:PORT, e.g. 127.0.0.1:8443");
    if (g_mode == M_LATENCY && !g_concurrency_set) g_concurrency = 1024;
    if (g_path[0] != '/') usage("--path must start with /");
}

/*
 * Server chain verification with a cache: a chain byte-identical to one that passed the full
 * X509_verify_cert (trust, validity, hostname) less than a second ago is accepted without redoing
 * the chain signatures. The server's CertificateVerify (proof of its key) is still checked by
 * libssl on every handshake. This keeps the client's per-handshake work below the server's.
 */
static unsigned char *g_vc_der;
static size_t g_vc_len;
static uint64_t g_vc_until;

static unsigned char *chain_der(X509_STORE_CTX *x, size_t *len) {
    STACK_OF(X509) *untrusted = X509_STORE_CTX_get0_untrusted(x);
    int n = untrusted ? sk_X509_num(untrusted) : 0;
    size_t total = 0;
    int lens[16];
    X509 *certs[16];
    certs[0] = X509_STORE_CTX_get0_cert(x);
    int k = 1;
    for (int i = 0; i < n && k < 16; i++) {
        X509 *c = sk_X509_value(untrusted, i);
        if (c != certs[0]) certs[k++] = c;
    }
    for (int i = 0; i < k; i++) {
        lens[i] = certs[i] ? i2d_X509(certs[i], NULL) : -1;
        if (lens[i] <= 0) return NULL;
        total += (size_t)lens[i];
    }
    unsigned char *buf = malloc(total), *p = buf;
    if (!buf) return NULL;
    for (int i = 0; i < k; i++) i2d_X509(certs[i], &p);
    *len = total;
    return buf;
}

static int verify_cached(X509_STORE_CTX *x, void *arg) {
    (void)arg;
    size_t len = 0;
    unsigned char *der = chain_der(x, &len);
    uint64_t t = now_ns();
    if (der && g_vc_der && len == g_vc_len && t < g_vc_until && memcmp(der, g_vc_der, len) == 0) {
        free(der);
        return 1;
    }
    int ok = X509_verify_cert(x);
    if (ok == 1 && der) {
        free(g_vc_der);
        g_vc_der = der;
        g_vc_len = len;
        g_vc_until = t + 1000000000ULL;
    } else {
        free(der);
    }
    return ok;
}

static SSL_CTX *make_ctx(void) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(ctx, g_tls_max);
    if (SSL_CTX_load_verify_locations(ctx, g_ca, NULL) != 1) {
        fprintf(stderr, "loadgen: cannot load --ca %s\n", g_ca);
        return NULL;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_cert_verify_callback(ctx, verify_cached, NULL);
    if (SSL_CTX_use_certificate_chain_file(ctx, g_cert) != 1) { /* leaf + intermediate */
        fprintf(stderr, "loadgen: cannot load --cert %s\n", g_cert);
        return NULL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, g_key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        fprintf(stderr, "loadgen: cannot load --key %s (or it does not match --cert)\n", g_key);
        return NULL;
    }
    X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
    struct in_addr tmp;
    if (inet_pton(AF_INET, g_sni, &tmp) == 1) X509_VERIFY_PARAM_set1_ip_asc(param, g_sni);
    else X509_VERIFY_PARAM_set1_host(param, g_sni, 0);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1); /* one recv per burst instead of two per record */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (!g_tickets) SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    if (g_mode == M_H2 && SSL_CTX_set_alpn_protos(ctx, (const unsigned char *)"\x02h2", 3) != 0) {
        fprintf(stderr, "loadgen: cannot set ALPN\n");
        return NULL;
    }
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF); /* sessions are kept per slot */
    return ctx;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int wait_events(struct epoll_event *evs, uint64_t until, uint64_t t) {
    uint64_t d = until > t ? until - t : 0;
    struct timespec ts = {(time_t)(d / 1000000000ULL), (long)(d % 1000000000ULL)};
#ifdef SYS_epoll_pwait2
    static int have_pwait2 = 1;
    if (have_pwait2) {
        long r = syscall(SYS_epoll_pwait2, g_epfd, evs, MAX_EVENTS, &ts, NULL, 0);
        if (r >= 0 || errno != ENOSYS) return (int)r;
        have_pwait2 = 0;
    }
#endif
    return epoll_wait(g_epfd, evs, MAX_EVENTS, (int)((d + 999999) / 1000000));
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    mallopt(M_TRIM_THRESHOLD, 64 << 20); /* OpenSSL allocates and frees a lot per handshake */
    mallopt(M_TOP_PAD, 16 << 20);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    g_ctx = make_ctx();
    if (!g_ctx) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    g_timeout_ns = (uint64_t)(g_timeout * 1e9);

    char req[4096];
    int len;
    if (g_mode == M_UPLOAD)
        len = snprintf(req, sizeof req,
                       "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/octet-stream\r\n"
                       "Content-Length: %zu\r\n\r\n",
                       g_path, g_sni, g_body_size);
    else if (g_mode == M_KEEPALIVE)
        len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", g_path, g_sni);
    else if (g_mode == M_H2) { /* the HEADERS frame's payload: an HPACK block (0: it did not fit) */
        size_t block = h2_request_block((uint8_t *)req, sizeof req);
        len = block ? (int)block : (int)sizeof req;
    } else if (g_mode == M_WEBSOCKET)
        len = snprintf(req, sizeof req,
                       "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                       g_path, g_sni);
    else
        len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                       g_path, g_sni);
    if (len < 0 || (size_t)len >= sizeof req) usage("--path too long");
    g_req = req;
    g_req_len = (size_t)len;
    if (g_mode == M_UPLOAD) {
        g_body = malloc(g_body_size ? g_body_size : 1);
        if (!g_body) {
            perror("malloc");
            return 1;
        }
        for (size_t i = 0; i < g_body_size; i++) g_body[i] = (char)('a' + i % 26);
    }

    if (g_mode == M_WEBSOCKET) { /* FIN + text, masked, then the mask and the masked payload */
        static const unsigned char mask[4] = {0x37, 0xfa, 0x21, 0x3d};
        g_frame[0] = (char)0x81;
        g_frame[1] = (char)(0x80 | WS_PAYLOAD);
        memcpy(g_frame + 2, mask, 4);
        for (int i = 0; i < WS_PAYLOAD; i++) g_frame[6 + i] = (char)(('a' + i % 26) ^ mask[i % 4]);
    }

    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    g_conns = calloc((size_t)g_concurrency, sizeof *g_conns);
    g_free = calloc((size_t)g_concurrency, sizeof *g_free);
    /* at most one live and one stale entry per slot */
    g_runq = calloc(2 * (size_t)g_concurrency, sizeof *g_runq);
    g_runq_work = calloc(2 * (size_t)g_concurrency, sizeof *g_runq_work);
    if (g_epfd < 0 || !g_conns || !g_free || !g_runq || !g_runq_work) {
        perror("setup");
        return 1;
    }
    if (g_mode == M_H2) {
        huff_init();
        for (int i = 0; i < g_concurrency; i++) {
            h2_t *h = calloc(1, sizeof *h);
            if (!h || !(h->hb = malloc(H2_BLOCK_MAX))) {
                perror("setup");
                return 1;
            }
            /* preface, SETTINGS, a request, and room for control frames (ACKs, WINDOW_UPDATEs) */
            h->ocap = sizeof H2_PREFACE + 9 + 9 + g_req_len + 1024;
            if (!(h->out = malloc(h->ocap))) {
                perror("setup");
                return 1;
            }
            g_conns[i].h2 = h;
        }
    }
    for (int i = g_concurrency - 1; i >= 0; i--) {
        g_conns[i].fd = -1;
        g_conns[i].idx = (uint32_t)i;
        g_free[g_nfree++] = (uint32_t)i;
    }

    g_t_start = now_ns();
    g_t_warm = g_t_start + (uint64_t)(g_warmup * 1e9);
    g_t_end = g_t_warm + (uint64_t)(g_duration * 1e9);
    uint64_t t_warm_real = g_t_warm, t_end_real = g_t_end, next_tick = g_t_start + TICK_NS;
    double cpu0 = 0, cpu1 = 0;
    int measuring = 0, ended = 0;
    uint64_t sched_i = 0, grace_until = 0;
    double interval = 1e9 / g_rate;

    if (g_mode != M_LATENCY) {
        g_nfree = 0;
        for (int i = 0; i < g_concurrency; i++) start_conn(&g_conns[i], 0);
    }
    static struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && t >= g_t_warm) {
            measuring = 1;
            g_counting = 1;
            t_warm_real = t;
            cpu0 = cpu_s();
        }
        if (!ended && t >= g_t_end) {
            ended = 1;
            g_counting = 0;
            g_stopping = 1;
            t_end_real = t;
            cpu1 = cpu_s();
            /* results are final; let the ops in flight finish (bounded) so the server sees clean
             * closes instead of handshakes cut off mid-way */
            grace_until = t + (g_timeout_ns < GRACE_NS ? g_timeout_ns : GRACE_NS);
        }
        if (ended && g_mode != M_LATENCY) {
            int busy = 0;
            for (int i = 0; i < g_concurrency && !busy; i++) busy = g_conns[i].state >= S_HANDSHAKE;
            if (!busy || t >= grace_until) break;
        }
        uint64_t until = next_tick;
        if (g_mode == M_LATENCY) {
            while (!ended) {
                uint64_t s = g_t_start + (uint64_t)((double)sched_i * interval);
                if (s >= g_t_end) break;
                if (s > t) {
                    if (s < until) until = s;
                    break;
                }
                if (g_nfree == 0) break; /* cap reached: start late, latency still from s */
                start_conn(&g_conns[g_free[--g_nfree]], s);
                sched_i++;
            }
            if (ended && r_inflight_measured == 0) break;
        }
        if (!measuring && g_t_warm < until) until = g_t_warm;
        if (!ended && g_t_end < until) until = g_t_end;
        if (ended && grace_until && grace_until < until) until = grace_until;
        if (t >= next_tick) {
            tick(t);
            next_tick = t + TICK_NS;
            continue;
        }
        int n = wait_events(evs, g_runq_n ? t : until, t);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            uint32_t idx = (uint32_t)(evs[i].data.u64 >> 32), gen = (uint32_t)evs[i].data.u64;
            conn_t *c = &g_conns[idx];
            if (c->gen == gen && c->fd >= 0) drive(c);
        }
        if (g_runq_n) { /* resume the connections that yielded (the ones queued before this pass) */
            size_t k = g_runq_n;
            uint64_t *work = g_runq_work;
            g_runq_work = g_runq;
            g_runq = work;
            g_runq_n = 0;
            for (size_t i = 0; i < k; i++) {
                conn_t *c = &g_conns[g_runq_work[i] >> 32];
                if (c->gen != (uint32_t)g_runq_work[i]) continue; /* closed since it yielded */
                c->queued = 0;
                if (c->fd >= 0) drive(c);
            }
        }
    }

    /* rates over the nominal window (what counts() used); CPU over the window the loop really saw */
    double seconds = (double)(g_t_end - g_t_warm) / 1e9;
    double cpu_seconds = (double)(t_end_real - t_warm_real) / 1e9;
    if (r_lat.n) qsort(r_lat.v, r_lat.n, sizeof *r_lat.v, cmp_u64);
    if (r_hs.n) qsort(r_hs.v, r_hs.n, sizeof *r_hs.v, cmp_u64);
    printf("{\"mode\":\"%s\",\"ops\":%llu,\"errors\":%llu,\"seconds\":%.3f,\"rate\":%.1f,", MODE_NAMES[g_mode],
           (unsigned long long)r_ops, (unsigned long long)r_errors, seconds, (double)r_ops / seconds);
    if (r_lat.n)
        printf("\"latency_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},", pct(&r_lat, 0.5),
               pct(&r_lat, 0.9), pct(&r_lat, 0.99), pct(&r_lat, 1.0));
    else
        printf("\"latency_us\":null,");
    if (r_hs.n)
        printf("\"handshakes\":%llu,\"handshake_us\":{\"p50\":%.1f,\"p99\":%.1f},",
               (unsigned long long)r_handshakes, pct(&r_hs, 0.5), pct(&r_hs, 0.99));
    if (g_mode == M_RESUMED)
        printf("\"resumed_fraction\":%.4f,", r_handshakes ? (double)r_resumed / (double)r_handshakes : 0.0);
    printf("\"bytes_sent\":%llu,\"bytes_received\":%llu,", (unsigned long long)r_sent,
           (unsigned long long)r_recv);
    if (g_mode == M_UPLOAD)
        printf("\"mib_per_s\":%.2f,", (double)r_body_sent / 1048576.0 / seconds);
    printf("\"client_cpu_s\":%.3f,\"client_cpu_fraction\":%.3f,\"concurrency\":%d}\n", cpu1 - cpu0,
           cpu_seconds > 0 ? (cpu1 - cpu0) / cpu_seconds : 0.0, g_concurrency);
    fflush(stdout);
    return 0;
}
