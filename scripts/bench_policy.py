"""Route policy decisions per second with 10 and 1,000 rules (pure CPU, no I/O).

Each policy has N distinct org-scoped routes plus the shipped example's shapes; requests are spread over
all the routes, with the last rules and unmatched paths included, so no case is favoured.
"""

from __future__ import annotations

import random
import time
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from gateway._paths import canonical
from gateway.config import RolesConfig
from gateway.policy import OriginalRequest, compile_policy


def policy(n: int) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [{"path": "/", "auth": "public"}, {"path": "/docs/**", "auth": "public"}]
    for i in range(n - 3):
        rules.append(
            {
                "path": f"/v1/service{i}/orgs/{{org}}/items/{{item}}/**",
                "org": {"path": "org"},
                "require": {"permission": f"service{i}:read"},
            }
        )
    rules.append({"path": "/v1/**", "org": {"header": "X-Org-Id"}})
    return {"rules": rules, "default": {"auth": "deny"}}


def requests(n: int, count: int) -> list[OriginalRequest]:
    rng = random.Random(7)  # noqa: S311 - a repeatable workload, not a secret
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.8:
            path = f"/v1/service{rng.randrange(n - 3)}/orgs/org_abc/items/it_{rng.randrange(99)}/sub/x"
        elif r < 0.9:
            path = "/docs/guide/caf%C3%A9"
        else:
            path = f"/nothing/{rng.randrange(1000)}"
        out.append(OriginalRequest("GET", "api.example.com", path, ""))
    return out


def main() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"X-Org-Id": "org_abc"}))
    print(f"{'rules':>6s} {'compile s':>10s} {'decisions/s':>12s} {'µs/decision':>12s}  (path check + match + decide)")
    for n in (10, 1000):
        t = time.perf_counter()
        p = compile_policy(policy(n), RolesConfig())
        compile_s = time.perf_counter() - t
        reqs = requests(n, 200_000)
        t = time.perf_counter()
        for r in reqs:
            p.decide(OriginalRequest(r.method, r.host, canonical(r.path), r.query), headers)
        elapsed = time.perf_counter() - t
        print(f"{n:6d} {compile_s:10.3f} {len(reqs) / elapsed:12,.0f} {elapsed / len(reqs) * 1e6:12.2f}")


if __name__ == "__main__":
    main()
