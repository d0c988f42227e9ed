"""Figures for the local control plane: build cost, start time, pod start latency.

    python benchmarks/controlplane.py [--pods 20] [--starts 3]

Build figures come from the build-info.json written when the binaries were built (a
cold build is only measured once per machine). Each start uses a fresh state dir (new
PKI, empty etcd) and is timed from the call to a Ready node. Pod latency is create →
first status with phase Running, seen through a watch, for pods created one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from finetune_localcluster import Cluster, ensure_binaries
from finetune_localcluster.rest import ApiError, Rest


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file() and not f.is_symlink())


def pod_latency(cluster: Cluster, count: int) -> list[float]:
    """Create ``count`` pods sequentially; return create→Running seconds for each."""
    api = Rest.from_kubeconfig(cluster.kubeconfig)
    ns = f"bench-{int(time.time())}"
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    while True:  # pods are rejected until the service-account controller adds "default"
        try:
            api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default")
            api.get(f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt")
            break
        except ApiError:  # 404 until the controllers catch up
            time.sleep(0.05)
    running: dict[str, float] = {}
    seen = threading.Condition()
    rv = api.get(f"/api/v1/namespaces/{ns}/pods")["metadata"]["resourceVersion"]

    def watch() -> None:
        for ev in api.watch(f"/api/v1/namespaces/{ns}/pods?resourceVersion={rv}", timeout=600):
            obj = ev.get("object", {})
            if obj.get("status", {}).get("phase") == "Running":
                with seen:
                    running.setdefault(obj["metadata"]["name"], time.monotonic())
                    seen.notify_all()

    threading.Thread(target=watch, daemon=True).start()
    out = []
    for i in range(count):
        name = f"p{i}"
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "60"]}],
            },
        }
        t0 = time.monotonic()
        api.post(f"/api/v1/namespaces/{ns}/pods", body)
        with seen:
            seen.wait_for(lambda n=name: n in running, timeout=60)  # type: ignore[misc]
        out.append(running[name] - t0)
    api.delete(f"/api/v1/namespaces/{ns}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=20)
    p.add_argument("--starts", type=int, default=3)
    a = p.parse_args()

    bins = ensure_binaries()
    info = bins.build_info
    print(f"binaries            {bins.dir}")
    print(f"versions            kubernetes {bins.k8s_version}, etcd {bins.etcd_version}")
    compiled = info.get("packages_compiled", "?")
    print(
        f"build time          {info.get('build_seconds', '?')} s when this cache entry was built "
        f"({compiled} packages compiled; a cold Go cache compiles ~2700)"
    )
    print(
        f"binary size         {bins.kube.stat().st_size / 2**20:.0f} MiB (one multi-call binary; "
        f"cache entry {_dir_size(bins.dir) / 2**20:.0f} MiB)"
    )

    starts = []
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        for i in range(a.starts):
            c = Cluster(Path(tmp) / f"s{i}", quiet=True)
            t0 = time.monotonic()
            c.start(reuse=False)
            starts.append(time.monotonic() - t0)
            if i < a.starts - 1:
                c.stop(quiet=True)
        print(f"start to Ready node {', '.join(f'{s:.1f}' for s in starts)} s (fresh state dir each; target < 10 s)")
        try:
            lat = pod_latency(c, a.pods)
        finally:
            c.stop(quiet=True)
    print(
        f"pod create→Running  p50 {statistics.median(lat) * 1000:.0f} ms, p99 {_pct(lat, 99) * 1000:.0f} ms, "
        f"max {max(lat) * 1000:.0f} ms over {len(lat)} pods"
    )


if __name__ == "__main__":
    main()
