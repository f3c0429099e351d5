"""Benchmark: ccurate ingest vs img2dataset 1.47 on the same URL list, same settings, same server.

A loopback HTTP server (asyncio, its own process, serving from memory) answers
for the URLs of `../shared/fixtures/real/laion_sample_10000.parquet`: each
real host gets its own 127.a.b.c address and the URL is rewritten to
`http://127.a.b.c:PORT/<original path>`, so both tools see the real host mix
(per-host limits and connection reuse work per real host). Every image URL
answers with one of K real-size photographic JPEGs (1024x768, 100-300 KB,
procedural landscapes); robots.txt and tdmrep.json answer 404 (ccurate fetches
them, as it does by default; img2dataset does not).

Both tools run as subprocesses with W worker processes x T threads, resize 256
keep_ratio, jpg quality 95, the same number of shards; wall time is
end to end (start-up included), peak RSS is the peak of the summed RSS of the
whole process tree (sampled every 0.1 s).

img2dataset lives in its own venv (it pins webdataset<0.3 and pandas<3),
created on first use: `python3 -m venv bench/.venv-img2dataset` + pip install.

`--probe` instead measures the two concurrency models for the downloader in
one process (thread pool + http.client vs asyncio streams + executor decode)
on the same server; the result chose threads for `ingest/fetch.py`.

Usage: .venv/bin/python bench/ingest_vs_img2dataset.py [--n 2000] [--workers 2] [--threads 32]
       [--repeat R]
Ends with: RESULT ingest ours_img_s=... anchor_img_s=... ratio=... ours_ok=... anchor_ok=...
ours_rss_mb=... anchor_rss_mb=... cpu_ratio=... rounds=... ratio_min=... ratio_max=... (medians
over the rounds; peak RSS the highest, ok counts the lowest) ours_cpu_ms=... anchor_cpu_ms=...
(CPU per image, all-in) ours_image_ms=... anchor_image_ms=... (the image work alone, one
thread: `image_floor`) ceiling=... (anchor_cpu_ms / ours_image_ms: the ratio ccurate would
reach if everything but its image work were free)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PARQUET = ROOT.parent / "shared" / "fixtures" / "real" / "laion_sample_10000.parquet"
I2D_VENV = ROOT / "bench" / ".venv-img2dataset"
IMAGE_CACHE = Path(tempfile.gettempdir()) / "ccurate-bench-ingest-images"


# ------------------------------------------------------------------ test images
def make_images(k: int) -> list[bytes]:
    """K distinct 1024x768 photographic JPEGs of 100-300 KB (cached across runs)."""
    from PIL import Image

    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    out: list[bytes] = []
    for seed in range(k):
        path = IMAGE_CACHE / f"{seed:03d}.jpg"
        if not path.exists():
            from ccurate.demo.corpus import landscape

            img = landscape(1000 + seed, 1024, 768)
            for q in (95, 96, 97, 98):
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=q)
                if buf.tell() >= 100_000:
                    break
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(path)
        data = path.read_bytes()
        assert Image.open(io.BytesIO(data)).size == (1024, 768)
        out.append(data)
    return out


# ------------------------------------------------------------------ server
def _serve(port_q: mp.Queue, k: int) -> None:
    images = make_images(k)
    not_found = b"not found"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not peer or not str(peer[0]).startswith("127."):
            writer.close()  # loopback clients only
            return
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                line = head.split(b"\r\n", 1)[0].split(b" ")
                if len(line) != 3:
                    break
                path, version = line[1], line[2]
                keep = version == b"HTTP/1.1" and b"connection: close" not in head.lower()
                if path == b"/robots.txt" or path.startswith(b"/.well-known/"):
                    status, ctype, body = b"404 Not Found", b"text/plain", not_found
                else:
                    status, ctype, body = b"200 OK", b"image/jpeg", images[zlib.crc32(path) % k]
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                    % (status, ctype, len(body), b"" if keep else b"Connection: close\r\n")
                )
                writer.write(body)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        # 0.0.0.0 so that every 127.a.b.c reaches us; non-loopback peers are refused above
        server = await asyncio.start_server(handle, "0.0.0.0", 0, backlog=4096)
        port_q.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_server(k: int) -> tuple[mp.process.BaseProcess, int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(q, k), daemon=True)
    proc.start()
    port = q.get(timeout=600)
    return proc, int(port)


# ------------------------------------------------------------------ URL list
def load_urls(n: int, port: int) -> list[tuple[str, str]]:
    """(rewritten url, caption) for the first n rows; one 127.a.b.c per real host."""
    import pyarrow.parquet as pq

    table = pq.read_table(PARQUET, columns=["URL", "TEXT"]).slice(0, n)
    hosts: dict[str, str] = {}
    out = []
    for url, text in zip(
        table.column("URL").to_pylist(), table.column("TEXT").to_pylist(), strict=True
    ):
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host not in hosts:
            i = len(hosts) + 1
            hosts[host] = f"127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        path = "".join(
            c if 33 <= ord(c) < 127 else f"%{ord(c):02X}" if ord(c) < 256 else "_" for c in path
        )
        out.append((f"http://{hosts[host]}:{port}{path}", text or ""))
    return out


# ------------------------------------------------------------------ measuring
def proc_cpu(pid: int) -> float:
    """User+system CPU seconds one live process has used so far."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


CPU_USED: dict[str, float] = {}


def timed_run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak summed RSS in MB, output) of a subprocess tree.

    CPU seconds of the tree (user+sys, from RUSAGE_CHILDREN) go to CPU_USED[cmd[0]]: on a
    shared machine images per CPU-second is steadier than images per wall second.
    """
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    peak = 0
    chunks: list[str] = []
    reader = threading.Thread(
        target=lambda: chunks.append(proc.stdout.read() if proc.stdout else ""), daemon=True
    )
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_USED[cmd[0]] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    reader.join()
    out = "".join(chunks)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return wall, peak / 1e6, out


def ensure_img2dataset() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print("creating", I2D_VENV, "(img2dataset 1.47 from PyPI) ...", flush=True)
    subprocess.check_call(["python3", "-m", "venv", str(I2D_VENV)])
    subprocess.check_call([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"])
    return exe


def run_img2dataset(urls: list[tuple[str, str]], work: Path, a: argparse.Namespace) -> tuple:
    import pyarrow as pa
    import pyarrow.parquet as pq

    exe = ensure_img2dataset()
    src = work / "i2d_urls.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in urls], "caption": [t for _, t in urls]}), src)
    out_dir = work / "i2d_out"
    per_shard = -(-len(urls) // a.shards)
    cmd = [
        str(exe),
        "--url_list",
        str(src),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_format",
        "webdataset",
        "--output_folder",
        str(out_dir),
        "--processes_count",
        str(a.workers),
        "--thread_count",
        str(a.threads),
        "--image_size",
        str(a.image_size),
        "--resize_mode",
        "keep_ratio",
        "--encode_format",
        "jpg",
        "--encode_quality",
        "95",
        "--number_sample_per_shard",
        str(per_shard),
        "--timeout",
        "10",
        "--retries",
        "0",
        "--distributor",
        "multiprocessing",
        "--enable_wandb",
        "False",
    ]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    wall, rss, log = timed_run(cmd, env)
    a.anchor_cpu = CPU_USED[cmd[0]]
    ok = 0
    for stats in out_dir.glob("*_stats.json"):
        ok += int(json.loads(stats.read_text()).get("successes", 0))
    return wall, rss, ok, log


def run_ours(urls: list[tuple[str, str]], work: Path, a: argparse.Namespace) -> tuple:
    src = work / "ours_urls.json"
    src.write_text(json.dumps(urls))
    cmd = [
        sys.executable,
        __file__,
        "--_ours",
        str(src),
        "--_work",
        str(work),
        "--workers",
        str(a.workers),
        "--threads",
        str(a.threads),
        "--shards",
        str(a.shards),
        "--image-size",
        str(a.image_size),
        "--decode-threads",
        str(a.decode_threads),
    ] + (["--no-optout"] if a.no_optout else [])
    wall, rss, log = timed_run(cmd)
    a.ours_cpu = CPU_USED[cmd[0]]
    line = next((x for x in log.splitlines() if x.startswith("OURS ")), None)
    if line is None:
        raise SystemExit(f"no OURS line in output:\n{log[-3000:]}")
    stats = json.loads(line[5:])
    return wall, rss, int(stats["kept"]), stats


def _ours_child(a: argparse.Namespace) -> None:
    """Runs inside the timed subprocess: plan partitions, then the ingest stage on W workers."""
    from ccurate.executor import LocalExecutor, tasks_for
    from ccurate.ingest.config import IngestConfig
    from ccurate.ingest.stage import IngestStage
    from ccurate.record import Sample, make_key
    from ccurate.shardio import write_partition

    urls = json.loads(Path(a._ours).read_text())
    work = Path(a._work)
    per = -(-len(urls) // a.shards)
    inputs = []
    # LAION lists repeat a few URLs; img2dataset downloads each row, so we do too (the
    # pipeline's planner would drop repeats as `duplicate_url`): a repeat gets its own key
    seen: set[str] = set()
    keys = []
    for row, (u, _) in enumerate(urls):
        keys.append(make_key(u) if u not in seen else make_key(u, f"bench-row-{row}"))
        seen.add(u)
    for i in range(a.shards):
        prefix = work / "ours_in" / f"shard-{i:05d}"
        recs = [
            Sample(key=keys[j], url=urls[j][0], alt_text=urls[j][1])
            for j in range(i * per, min(len(urls), (i + 1) * per))
        ]
        write_partition(prefix, recs)
        inputs.append(str(prefix))
    cfg = IngestConfig(
        allow_private=True,
        image_size=a.image_size,
        resize_mode="keep_ratio",
        output_format="jpg",
        encode_quality=95,
        threads=a.threads,
        decode_threads=a.decode_threads,
        connect_timeout=10,
        read_timeout=10,
        retries=0,
        respect_robots_txt=not a.no_optout,
        respect_tdmrep=not a.no_optout,
    )
    stage = IngestStage(cfg)
    stats = LocalExecutor(workers=a.workers, progress=False).map(
        stage, tasks_for(inputs, work / "ours_out")
    )
    print("OURS " + json.dumps(stats.to_json()), flush=True)


# ------------------------------------------------------------------ probe: threads vs asyncio
def probe(urls: list[str], threads: int, image_size: int) -> dict[str, float]:
    """img/s of fetch+decode+resize in one process: thread pool vs asyncio + decode executor."""
    from concurrent.futures import ThreadPoolExecutor

    from ccurate.ingest.fetch import FetchOptions, HttpClient
    from ccurate.ingest.images import ImageOptions, process_image

    opt = ImageOptions(image_size=image_size)

    def threaded() -> int:
        client = HttpClient(FetchOptions(allow_private=True, per_host_connections=4))

        def one(u: str) -> bool:
            r = client.get(u)
            if not r.ok:
                return False
            process_image(r.body, opt)
            return True

        with ThreadPoolExecutor(threads) as pool:
            ok = sum(pool.map(one, urls))
        client.close()
        return ok

    async def fetch_async(u: str, pools: dict[str, list], sem: asyncio.Semaphore) -> bytes | None:
        parts = urlsplit(u)
        key = f"{parts.hostname}:{parts.port}"
        async with sem:
            conns = pools.setdefault(key, [])
            if conns:
                reader, writer = conns.pop()
            else:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            path = parts.path + ("?" + parts.query if parts.query else "")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {key}\r\nUser-Agent: probe\r\n"
                "Accept-Encoding: identity\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            if len(conns) < 4:
                conns.append((reader, writer))
            else:
                writer.close()
            return body if head.startswith(b"HTTP/1.1 200") else None

    async def asynced() -> int:
        loop = asyncio.get_running_loop()
        pools: dict[str, list] = {}
        sem = asyncio.Semaphore(threads)
        decode_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2))

        async def one(u: str) -> bool:
            body = await fetch_async(u, pools, sem)
            if body is None:
                return False
            await loop.run_in_executor(decode_pool, process_image, body, opt)
            return True

        ok = sum(await asyncio.gather(*(one(u) for u in urls)))
        decode_pool.shutdown()
        for conns in pools.values():
            for _, w in conns:
                w.close()
        return ok

    res: dict[str, float] = {}
    for name, fn in [
        ("threads", threaded),
        ("asyncio", lambda: asyncio.run(asynced())),
        ("threads_2", threaded),
        ("asyncio_2", lambda: asyncio.run(asynced())),
    ]:
        t0 = time.perf_counter()
        ok = fn()
        res[name] = ok / (time.perf_counter() - t0)
        print(f"probe {name}: {ok} ok, {res[name]:.1f} img/s", flush=True)
    return res


# ------------------------------------------------------------------ floor: the image work alone
def image_floor(images: list[bytes], image_size: int, reps: int = 3) -> dict[str, float]:
    """CPU ms per image of the per-image work each tool cannot skip, one thread, no I/O.

    Ours: `process_image` (DCT-scaled decode, area resize, q95 encode with optimised
    Huffman tables, SHA-256 of the body) plus `image_hashes` (pixel SHA-256, pHash, dHash
    for dedup). img2dataset's resizer: `cv2.imdecode`, `cv2.resize(INTER_AREA)`,
    `cv2.imencode` q95, SHA-256 of the body (its default `compute_hash`). Set against the
    anchor's measured CPU per image this gives a ceiling: the ratio ccurate would reach if
    everything but its image work (HTTP, opt-out look-ups, records, writing) cost nothing."""
    import hashlib

    import cv2
    import numpy as np

    from ccurate.filters.hashing import image_hashes
    from ccurate.ingest.images import ImageOptions, process_image

    cv2.setNumThreads(1)
    opt = ImageOptions(image_size=image_size, resize_mode="keep_ratio", encode_quality=95)

    def ours_image(d: bytes) -> None:
        process_image(d, opt)

    def ours_hashes(d: bytes) -> None:
        image_hashes(process_image(d, opt).image)

    def anchor(d: bytes) -> None:
        hashlib.sha256(d).hexdigest()
        a = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED)
        h, w = a.shape[:2]
        f = image_size / min(h, w)
        a = cv2.resize(a, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 95])

    def ms(fn: Any) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.thread_time()
            for d in images:
                fn(d)
            best = min(best, (time.thread_time() - t0) / len(images))
        return best * 1e3

    image_ms = ms(ours_image)
    return {"ours_image_ms": image_ms, "ours_image_hashes_ms": ms(ours_hashes),
            "anchor_image_ms": ms(anchor)}  # fmt: skip


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="URLs (rows of the LAION sample)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="ccurate's decode threads per worker (0: its default, one per core)",
    )
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--distinct-images", type=int, default=48)
    ap.add_argument("--probe", action="store_true", help="threads vs asyncio, then exit")
    ap.add_argument("--only", choices=["ours", "anchor"], default=None)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of both tools, order alternating; figures are the medians (a shared host "
        "drifts by 20-30 %% within minutes, so one round's ratio can mislead)",
    )
    ap.add_argument(
        "--no-optout",
        action="store_true",
        help="ccurate without robots.txt/TDMRep look-ups (breakdown only)",
    )
    ap.add_argument("--_ours", help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._ours:
        _ours_child(a)
        return
    print(f"generating {a.distinct_images} test images ...", flush=True)
    make_images(a.distinct_images)
    server, port = start_server(a.distinct_images)
    work = Path(tempfile.mkdtemp(prefix="ccurate-bench-ingest-"))
    try:
        urls = load_urls(a.n, port)
        print(
            f"{len(urls)} URLs on {len({urlsplit(u).hostname for u, _ in urls})} hosts, "
            f"server :{port}, {a.workers} workers x {a.threads} threads",
            flush=True,
        )
        if a.probe:
            probe([u for u, _ in urls], a.threads, a.image_size)
            return
        rounds: list[dict[str, float]] = []
        for r in range(max(1, a.repeat)):
            order = ["ours", "anchor"] if r % 2 == 0 else ["anchor", "ours"]
            got: dict[str, float] = {}
            for tool in order:
                if a.only is not None and tool != a.only:
                    continue
                rdir = work / f"round{r}"
                rdir.mkdir(exist_ok=True)
                server_cpu0 = proc_cpu(server.pid or 0)
                if tool == "ours":
                    wall, rss, ok, stats = run_ours(urls, rdir, a)
                    cpu, drops = a.ours_cpu, f"; drops {stats.get('drops')}"
                else:
                    wall, rss, ok, _ = run_img2dataset(urls, rdir, a)
                    cpu, drops = a.anchor_cpu, ""
                label = "ccurate:    " if tool == "ours" else "img2dataset:"
                server_cpu = proc_cpu(server.pid or 0) - server_cpu0
                print(
                    f"{label} {ok} ok in {wall:.1f}s = {ok / wall:.1f} img/s, {cpu:.1f} CPU-s ="
                    f" {ok / cpu:.1f} img/CPU-s, peak RSS {rss:.0f} MB (server: {server_cpu:.1f}"
                    f" CPU-s){drops}",
                    flush=True,
                )
                got.update({f"{tool}_img_s": ok / wall, f"{tool}_cpu_img_s": ok / cpu})
                got.update({f"{tool}_ok": ok, f"{tool}_rss_mb": rss})
            if "ours_img_s" in got and "anchor_img_s" in got:
                got["ratio"] = got["ours_img_s"] / got["anchor_img_s"]
                got["cpu_ratio"] = got["ours_cpu_img_s"] / got["anchor_cpu_img_s"]
                print(
                    f"round {r + 1}: ratio {got['ratio']:.2f}, cpu-normalised ratio (img per "
                    f"CPU-second) {got['cpu_ratio']:.2f}",
                    flush=True,
                )
            rounds.append(got)
        if all("ratio" in g for g in rounds):

            def med(k: str) -> float:
                return float(statistics.median(g[k] for g in rounds))

            ratios = [g["ratio"] for g in rounds]
            floor = image_floor(make_images(a.distinct_images), a.image_size)
            ours_ms, anchor_ms = 1e3 / med("ours_cpu_img_s"), 1e3 / med("anchor_cpu_img_s")
            ceiling = anchor_ms / floor["ours_image_hashes_ms"]
            print(
                f"CPU per image, all-in: ccurate {ours_ms:.2f} ms, img2dataset {anchor_ms:.2f} ms; "
                f"image work alone (one thread): ccurate {floor['ours_image_ms']:.2f} ms "
                f"+ dedup hashes = {floor['ours_image_hashes_ms']:.2f} ms, img2dataset's resizer "
                f"{floor['anchor_image_ms']:.2f} ms; ceiling (all but ccurate's image work "
                f"free) {ceiling:.2f}x",
                flush=True,
            )
            print(
                f"RESULT ingest ours_img_s={med('ours_img_s'):.1f} "
                f"anchor_img_s={med('anchor_img_s'):.1f} ratio={med('ratio'):.2f} "
                f"ours_ok={min(int(g['ours_ok']) for g in rounds)} "
                f"anchor_ok={min(int(g['anchor_ok']) for g in rounds)} "
                f"ours_rss_mb={max(g['ours_rss_mb'] for g in rounds):.0f} "
                f"anchor_rss_mb={max(g['anchor_rss_mb'] for g in rounds):.0f} "
                f"cpu_ratio={med('cpu_ratio'):.2f} rounds={len(rounds)} "
                f"ratio_min={min(ratios):.2f} ratio_max={max(ratios):.2f} "
                f"ours_cpu_ms={ours_ms:.2f} anchor_cpu_ms={anchor_ms:.2f} "
                f"ours_image_ms={floor['ours_image_hashes_ms']:.2f} "
                f"anchor_image_ms={floor['anchor_image_ms']:.2f} ceiling={ceiling:.2f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.join(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
