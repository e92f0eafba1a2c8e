"""A child process that writes to stderr what receiver children may: a URL with its token, gRPC's
own log lines, a very long line, a traceback. Started by `childproc.spawn` in a test."""

from __future__ import annotations

import sys
import traceback


def main() -> None:
    url = sys.stdin.readline().strip()
    err = sys.stderr
    err.write(f"url {url}\n")
    err.write("E1204 16:30:00.123456    4242 chttp2_transport.cc:1234] Got error on stream\n")
    err.write("I1204 16:30:00.223456    4242 chttp2_transport.cc:2345] Got goaway [2] err=...\n")
    err.write("y" * 5000 + "\n")
    try:
        raise RuntimeError("something broke")
    except RuntimeError:
        traceback.print_exc()
    err.write("last line")  # no newline: the end of the stream ends it
    err.flush()
    sys.stdin.read()  # until the parent hangs up


if __name__ == "__main__":
    main()
