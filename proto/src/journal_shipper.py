#!/usr/bin/python3
# Ships this machine's journal (chosen units) to CloudWatch Logs. Written by Flotilla.
#
# python3 and its standard library only: cloud-init's language, so on every image that
# runs it, with no agent to install. Credentials come from the environment, else the
# instance role through IMDSv2; requests are signed with SigV4. A cursor file makes a
# restart resume after the last shipped entry, neither losing nor repeating one.
#
# Usage: journal-shipper.py CONFIG.json   (keys: see flotilla_proto::journal::ShipperConfig)
import datetime
import hashlib
import hmac
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

IMDS = "http://169.254.169.254"
# PutLogEvents: at most 10,000 events and 1,048,576 bytes (message bytes + 26 each).
MAX_BATCH_EVENTS = 10000
MAX_BATCH_BYTES = 1048576 - 64 * 1024
MAX_EVENT_BYTES = 200 * 1024
FLUSH_SECONDS = 5.0


def log(msg):
    print("journal-shipper: " + msg, file=sys.stderr, flush=True)


def imds_get(path, token):
    req = urllib.request.Request(IMDS + path, headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def imds_token():
    req = urllib.request.Request(
        IMDS + "/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


class Credentials:
    """Environment credentials, else the instance role's, refreshed before they expire."""

    def __init__(self):
        self.key = os.environ.get("AWS_ACCESS_KEY_ID")
        self.secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        self.token = os.environ.get("AWS_SESSION_TOKEN")
        self.from_env = bool(self.key and self.secret)
        self.expires = 0.0

    def get(self):
        if not self.from_env and time.time() > self.expires - 300:
            t = imds_token()
            role = imds_get("/latest/meta-data/iam/security-credentials/", t).split()[0]
            c = json.loads(imds_get("/latest/meta-data/iam/security-credentials/" + role, t))
            self.key, self.secret, self.token = c["AccessKeyId"], c["SecretAccessKey"], c["Token"]
            exp = datetime.datetime.strptime(c["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
            self.expires = exp.replace(tzinfo=datetime.timezone.utc).timestamp()
        return self.key, self.secret, self.token


def _hmac(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(method, url, headers, body, key, secret, token, region, service, now):
    """SigV4 headers for one request (`now`: a UTC datetime). Returns the headers to send."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    out = dict(headers)
    out["Host"] = parts.netloc
    out["X-Amz-Date"] = amz_date
    if token:
        out["X-Amz-Security-Token"] = token
    canon = sorted((k.lower(), " ".join(str(v).split())) for k, v in out.items())
    signed = ";".join(k for k, _ in canon)
    canonical_request = "\n".join(
        [
            method,
            urllib.parse.quote(parts.path or "/", safe="/-_.~"),
            parts.query,
            "".join("%s:%s\n" % kv for kv in canon),
            signed,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = "%s/%s/%s/aws4_request" % (day, region, service)
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    k = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), day), region), service), "aws4_request")
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        key,
        scope,
        signed,
        sig,
    )
    return out


class AwsError(Exception):
    def __init__(self, code, message):
        super().__init__("%s: %s" % (code, message))
        self.code = code


class Logs:
    def __init__(self, region, endpoint, creds):
        self.region = region
        self.url = endpoint or "https://logs.%s.amazonaws.com/" % region
        if not self.url.endswith("/"):
            self.url += "/"
        self.creds = creds

    def call(self, op, payload):
        body = json.dumps(payload).encode()
        key, secret, token = self.creds.get()
        headers = sign(
            "POST",
            self.url,
            {
                "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": "Logs_20140328." + op,
            },
            body,
            key,
            secret,
            token,
            self.region,
            "logs",
            datetime.datetime.now(datetime.timezone.utc),
        )
        headers.pop("Host")
        req = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read() or b"{}")
            except ValueError:
                err = {}
            code = str(err.get("__type", "HTTP%d" % e.code)).split("#")[-1]
            raise AwsError(code, err.get("message", err.get("Message", e.reason)))
        return json.loads(raw or b"{}")


def message_of(entry):
    """`<unit>: <MESSAGE>`; journald gives non-UTF-8 messages as a list of bytes."""
    msg = entry.get("MESSAGE", "")
    if isinstance(msg, list):
        msg = bytes(b & 0xFF for b in msg if isinstance(b, int)).decode("utf-8", "replace")
    elif not isinstance(msg, str):
        msg = "" if msg is None else str(msg)
    unit = entry.get("_SYSTEMD_UNIT") or entry.get("SYSLOG_IDENTIFIER") or "-"
    text = "%s: %s" % (unit, msg)
    raw = text.encode()
    if len(raw) > MAX_EVENT_BYTES:
        text = raw[: MAX_EVENT_BYTES - 20].decode("utf-8", "ignore") + " (cut: too long)"
    return text


class Shipper:
    def __init__(self, cfg, logs, stream):
        self.cfg = cfg
        self.logs = logs
        self.stream = stream
        self.cursor_file = cfg["cursor_file"]
        self.batch = []  # (timestamp_ms, message, cursor)
        self.size = 0
        self.delay = 1.0

    def create_stream(self):
        while True:
            try:
                self.logs.call(
                    "CreateLogStream",
                    {"logGroupName": self.cfg["group"], "logStreamName": self.stream},
                )
                return
            except AwsError as e:
                if e.code == "ResourceAlreadyExistsException":
                    return
                self.backoff("CreateLogStream", e)
            except (OSError, ValueError) as e:
                self.backoff("CreateLogStream", e)

    def backoff(self, op, err):
        """Waits before the next try: 1 s doubling to a minute (throttling, no network)."""
        log("%s on group %s failed (%s); retrying in %.0f s" % (op, self.cfg["group"], err, self.delay))
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 60.0)

    def add(self, entry):
        try:
            ts = int(entry["__REALTIME_TIMESTAMP"]) // 1000
        except (KeyError, ValueError, TypeError):
            ts = int(time.time() * 1000)
        msg = message_of(entry)
        n = len(msg.encode()) + 26
        if self.batch and (
            len(self.batch) >= MAX_BATCH_EVENTS
            or self.size + n > MAX_BATCH_BYTES
            or ts - self.batch[0][0] > 23 * 3600 * 1000
        ):
            self.flush()
        # CloudWatch wants a batch in time order; the journal is, except across clock steps.
        if self.batch and ts < self.batch[-1][0]:
            ts = self.batch[-1][0]
        self.batch.append((ts, msg, entry.get("__CURSOR")))
        self.size += n

    def flush(self):
        if not self.batch:
            return
        payload = {
            "logGroupName": self.cfg["group"],
            "logStreamName": self.stream,
            "logEvents": [{"timestamp": t, "message": m} for t, m, _ in self.batch],
        }
        while True:
            try:
                out = self.logs.call("PutLogEvents", payload)
                self.delay = 1.0
                rejected = out.get("rejectedLogEventsInfo")
                if rejected:
                    # Older than 14 days (or the retention), or over 2 hours ahead: CloudWatch
                    # keeps the rest. Say so rather than retry what it will never take.
                    log("CloudWatch rejected part of a batch of %d: %s" % (len(self.batch), json.dumps(rejected)))
                break
            except AwsError as e:
                if e.code == "ResourceNotFoundException":
                    self.create_stream()
                    continue
                self.backoff("PutLogEvents", e)
            except (OSError, ValueError) as e:
                self.backoff("PutLogEvents", e)
        cursor = next((c for _, _, c in reversed(self.batch) if c), None)
        if cursor:
            tmp = self.cursor_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(cursor)
            os.replace(tmp, self.cursor_file)
        self.batch, self.size = [], 0

    def run(self):
        self.create_stream()
        cmd = [self.cfg.get("journalctl", "journalctl"), "--output=json", "--all"]
        if self.cfg.get("follow", True):
            cmd.append("--follow")
        cursor = None
        if os.path.exists(self.cursor_file):
            with open(self.cursor_file) as f:
                cursor = f.read().strip() or None
        cmd.append("--after-cursor=" + cursor if cursor else "--boot")
        for unit in self.cfg["units"]:
            cmd.append("--unit=" + unit)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        buf = b""
        deadline = time.monotonic() + FLUSH_SECONDS
        fd = proc.stdout.fileno()
        while True:
            wait = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        try:
                            self.add(json.loads(line))
                        except ValueError:
                            log("skipped a journal line that is not JSON")
            if time.monotonic() >= deadline:
                self.flush()
                deadline = time.monotonic() + FLUSH_SECONDS
        self.flush()
        return proc.wait()


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    creds = Credentials()
    region, instance = cfg.get("region"), cfg.get("instance_id")
    if not region or not instance:
        t = imds_token()
        region = region or imds_get("/latest/meta-data/placement/region", t)
        instance = instance or imds_get("/latest/meta-data/instance-id", t)
    logs = Logs(region, cfg.get("endpoint_url"), creds)
    sys.exit(Shipper(cfg, logs, cfg["stream_prefix"] + instance).run())


if __name__ == "__main__":
    main()
