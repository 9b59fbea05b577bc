"""Sans-I/O HTTP/1.1 relay logic on h11: strict framing, header rewriting, XFCC, routing.

Nothing in this package imports trio or touches a socket; the server package moves the
bytes and asks these modules what to do with them.
"""
