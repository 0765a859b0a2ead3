"""A burst of concurrent large requests against a running server: N at once of a 57 MiB `.npy`
/v1/grad (15M float32). Prints the statuses; exits 1 unless every answer is a correct 200 or a 503
with Retry-After, and at least one is a 200.

    python scripts/burst.py URL [N] [TOKEN]
"""

from __future__ import annotations

import http.client
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np


def main() -> int:
    url = urlsplit(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    token = sys.argv[3] if len(sys.argv) > 3 else ""
    x = np.linspace(-2, 2, 15_000_000, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    headers = {"content-type": "application/x-npy", "accept": "application/x-npy"}
    if token:
        headers["authorization"] = f"Bearer {token}"

    def one(_: int) -> str:
        try:
            c = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
            c.request("POST", "/v1/grad", body, headers)
            r = c.getresponse()
            data = r.read()
            c.close()
        except OSError as exc:
            return f"error {exc!r}"
        if r.status == 503:
            return "503" if r.getheader("retry-after") == "1" else "503 without Retry-After"
        if r.status != 200:
            return f"{r.status} {data[:200]!r}"
        g = np.load(io.BytesIO(data))
        ok = g.shape == x.shape and g[0] == 0 and g[7_500_000] == np.float32(1 - abs(x[7_500_000]))
        return "200" if ok else "200 WRONG"

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    counts = {s: results.count(s) for s in sorted(set(results))}
    print(f"{n} concurrent 57 MiB requests: {counts}")
    return 0 if set(results) <= {"200", "503"} and "200" in results else 1


if __name__ == "__main__":
    sys.exit(main())
