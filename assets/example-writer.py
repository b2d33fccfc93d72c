#!/usr/bin/env python3
"""A complete freezeframe writer: an application that takes part in snapshots.

It keeps records in memory, writes them into its own region of the live
volume through the node's mount, and on `freeze` flushes everything it has
and holds new writes until `thaw` (or `abort`). Run it beside a node:

    python3 assets/example-writer.py --socket DIR/nodes/n1/run/writer.sock \
        --volume DIR/nodes/n1/mnt/live/volume.img --offset 0 --name app-n1

The protocol is described in docs/writer-protocol.md.
"""
import argparse, json, os, socket, threading, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--volume", required=True, help="live/volume.img on this node's mount")
    ap.add_argument("--offset", type=int, default=0, help="start of this application's region")
    ap.add_argument("--name", default="example-writer")
    args = ap.parse_args()

    records = []          # what the application has taken (in memory)
    written = 0           # how many of them are in the volume
    lock = threading.Lock()
    frozen = threading.Event()

    fd = os.open(args.volume, os.O_RDWR)

    def flush():
        nonlocal written
        with lock:
            data = b"".join(records[written:])
            if data:
                os.pwrite(fd, data, args.offset + written * 64)
                written = len(records)
            os.fsync(fd)

    def produce():
        n = 0
        while True:
            if frozen.is_set():          # hold writes while frozen
                time.sleep(0.001)
                continue
            with lock:
                records.append(f"{args.name} record {n:08d}".ljust(63).encode() + b"\n")
            n += 1
            if n % 16 == 0:
                flush()
            time.sleep(0.002)

    threading.Thread(target=produce, daemon=True).start()

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(args.socket)
    f = s.makefile("rw")
    def send(obj):
        f.write(json.dumps(obj) + "\n"); f.flush()

    send({"op": "register", "name": args.name, "on_error": "fail", "freeze_timeout_ms": 5000})
    for line in f:
        ev = json.loads(line)
        kind = ev["event"]
        if kind == "registered":
            print(f"registered as {ev['writer']}", flush=True)
            continue
        if kind == "error":
            print(f"node says: {ev['message']}", flush=True)
            continue
        snap = ev["snapshot"]
        if kind == "freeze":
            frozen.set()                  # stop taking new writes...
            flush()                       # ...and make everything taken durable
            print(f"frozen for snapshot {snap} with {written} records", flush=True)
        elif kind == "post_snapshot":
            print(f"snapshot {snap} is at {ev['path']}", flush=True)
        elif kind in ("thaw", "abort"):
            frozen.clear()
            print(f"{kind} snapshot {snap}" + (f": {ev.get('reason')}" if kind == "abort" else ""), flush=True)
        send({"op": "ack", "event": kind, "snapshot": snap})

if __name__ == "__main__":
    main()
