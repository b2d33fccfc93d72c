#!/usr/bin/env python3
"""A complete freezeframe writer: an application that takes part in snapshots.

It keeps records in memory, writes them into its own region of the live
volume through the node's mount, and on `freeze` flushes everything it has
and holds new writes until `thaw` or `abort`. Run it beside a node:

    python3 assets/example-writer.py --socket DIR/nodes/n1/run/writer.sock \
        --volume DIR/nodes/n1/mnt/live/volume.img --offset 0 --name app-n1

What the writer protocol (docs/writer-protocol.md) asks of a client, and this
one does:
- it never stays frozen: it resumes writes by itself when the freeze's
  `lease_ms` passes without `thaw`/`abort`, and when its connection to the
  node drops;
- it outlives its node: when the node goes away it keeps writing, reconnects
  every `--retry` seconds and registers again;
- every freeze ends with exactly one outcome: `complete` (the snapshot is kept)
  or `abort` (it is not); `thaw` only means "resume writes".

It prints one line per event and state change on stdout, JSON with a
monotonic timestamp, e.g.
    {"t": 1234.5, "event": "freeze", "snapshot": 7, "lease_ms": 9950}
    {"t": 1234.6, "state": "holding", "snapshot": 7, "records": 344}
    {"t": 1240.2, "state": "resumed", "snapshot": 7, "why": "lease"}
"""
import argparse, json, os, socket, threading, time


def log(**fields):
    print(json.dumps({"t": round(time.monotonic() * 1000, 1), **fields}), flush=True)


class App:
    """Records in memory, written into the volume unless writes are held."""

    def __init__(self, volume, offset, name):
        self.volume = volume
        self.fd = os.open(volume, os.O_RDWR)
        self.offset, self.name = offset, name
        self.records, self.written = [], 0
        self.lock = threading.Lock()
        self.held_for = None          # snapshot id writes are held for
        self.deadline = None          # monotonic time the hold ends by itself

    def flush(self):
        try:
            self._flush()
        except OSError:                # a mount from before the node restarted?
            self.reopen()
            self._flush()

    def _flush(self):
        with self.lock:
            data = b"".join(self.records[self.written:])
            if data:
                os.pwrite(self.fd, data, self.offset + self.written * 64)
                self.written = len(self.records)
            os.fsync(self.fd)

    def produce(self):
        n = 0
        while True:
            with self.lock:
                if self.held_for is not None and self.deadline is not None \
                        and time.monotonic() >= self.deadline:
                    self._resume_locked("lease")
                held = self.held_for is not None
            if held:                   # hold writes while frozen
                time.sleep(0.001)
                continue
            with self.lock:
                self.records.append(f"{self.name} record {n:08d}".ljust(63).encode() + b"\n")
            n += 1
            if n % 16 == 0:
                try:
                    self.flush()
                except OSError as e:   # the node's mount is away: keep the records
                    log(state="write_error", error=str(e))
                    time.sleep(0.5)
            time.sleep(0.002)

    def reopen(self):
        """After the node restarted, its mount is a new one: open the volume again."""
        try:
            fd = os.open(self.volume, os.O_RDWR)
        except OSError:
            return
        with self.lock:
            try:
                os.close(self.fd)
            except OSError:
                pass                   # the old mount is gone; its fd is closed anyway
            self.fd = fd

    def hold(self, snapshot, lease_ms):
        with self.lock:
            self.held_for = snapshot
            self.deadline = time.monotonic() + lease_ms / 1000 if lease_ms is not None else None
        self.flush()                   # everything taken is durable before the ack
        log(state="holding", snapshot=snapshot, records=self.written)

    def resume(self, why, snapshot=None):
        with self.lock:
            if self.held_for is not None and (snapshot is None or snapshot == self.held_for):
                self._resume_locked(why)

    def _resume_locked(self, why):
        log(state="resumed", snapshot=self.held_for, why=why)
        self.held_for, self.deadline = None, None


def session(app, args):
    """One connection to the node; returns when it ends."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(args.socket)
    f = s.makefile("rw")

    def send(obj):
        f.write(json.dumps(obj) + "\n")
        f.flush()

    register = {"op": "register", "name": args.name, "on_error": "fail"}
    if args.freeze_timeout_ms is not None:
        register["freeze_timeout_ms"] = args.freeze_timeout_ms
    send(register)
    try:
        for line in f:
            ev = json.loads(line)
            kind = ev.get("event")
            log(**{k: v for k, v in ev.items()})
            if kind in ("registered", "error"):
                continue
            snap = ev["snapshot"]
            if kind == "freeze":
                app.hold(snap, ev.get("lease_ms"))
            elif kind == "post_snapshot":
                pass                   # the snapshot is at ev["path"] on this node
            elif kind in ("thaw", "abort", "complete"):
                app.resume(kind, snap)
            if kind in ("freeze", "post_snapshot", "thaw"):
                send({"op": "ack", "event": kind, "snapshot": snap})
            # complete and abort are outcomes: no ack.
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--volume", required=True, help="live/volume.img on this node's mount")
    ap.add_argument("--offset", type=int, default=0, help="start of this application's region")
    ap.add_argument("--name", default="example-writer")
    ap.add_argument("--freeze-timeout-ms", type=int, default=None,
                    help="how long the node waits for this writer to flush on freeze "
                         "(default: the node's writer_timeout)")
    ap.add_argument("--retry", type=float, default=1.0,
                    help="seconds between reconnects when the node is away")
    args = ap.parse_args()

    app = App(args.volume, args.offset, args.name)
    threading.Thread(target=app.produce, daemon=True).start()
    while True:
        try:
            session(app, args)
            why = "node closed the connection"
        except (OSError, ValueError) as e:
            why = str(e)
        app.resume("disconnect")       # nobody can thaw us now: resume by ourselves
        log(state="disconnected", why=why)
        time.sleep(args.retry)


if __name__ == "__main__":
    main()
