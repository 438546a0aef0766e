"""A batch job with a canvas: 20,000 order lines split into chunks of 500, each chunk totalled
by a worker, then one chord callback merging the chunk totals into a report.

    python examples/batch_sales_report.py [sqlite:///sales.db | redis://localhost:6379/0]

The broker and result backend are one SQLite file in a temporary directory unless a URL is
given: the callback reads the chunks' results from the backend page by page (a chord of
100,000 members never travels in one message), so the worker's processes must share it.
The same job from the command line, given orders.jsonl (one order a line):

    stem enqueue sales.chunk_totals --chunks orders.jsonl --size 500 --wait
"""

import random
import sys
import tempfile

from stem import Stem, TaskRegistry, Worker, WorkerLifecycleConfig
from stem.canvas import chord, chunks

registry = TaskRegistry()
REGIONS = ("north", "south", "east", "west")


@registry.task("sales.chunk_totals")
def chunk_totals(ctx, items):
    """Revenue and order count per region for one chunk of order lines."""
    totals = {}
    for order in items:
        region = totals.setdefault(order["region"], {"revenue_cents": 0, "orders": 0})
        region["revenue_cents"] += order["quantity"] * order["unit_price_cents"]
        region["orders"] += 1
    return totals


@registry.task("sales.report")
def report(ctx):
    """The chord callback: ``ctx.previous`` holds every chunk's totals, in input order."""
    merged = {r: {"revenue_cents": 0, "orders": 0} for r in REGIONS}
    chunks_seen = 0
    for totals in ctx.previous:
        chunks_seen += 1
        for region, t in totals.items():
            merged[region]["revenue_cents"] += t["revenue_cents"]
            merged[region]["orders"] += t["orders"]
    return {"chunks": chunks_seen, "regions": merged}


def orders(n: int) -> list[dict]:
    rng = random.Random(42)
    return [{"id": i, "region": rng.choice(REGIONS), "quantity": rng.randint(1, 5),
             "unit_price_cents": rng.randint(100, 5000)} for i in range(n)]


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/sales.db"
    lines = orders(20_000)
    stem = Stem(url, url, registry)
    job = stem.apply(chord(chunks("sales.chunk_totals", lines, size=500), registry.signature("sales.report")))
    print(f"job {job.id}: {len(lines)} order lines in {len(lines) // 500} chunks")

    worker = Worker(url, url, registry, concurrency=2,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
    worker.start(burst=True)        # runs the chunks and the report, then returns

    result = job.get(timeout=60)
    print(f"progress: {job.progress()}")
    for region, t in sorted(result["regions"].items()):
        print(f"{region:>6}: {t['orders']:>5} orders, {t['revenue_cents'] / 100:>12,.2f}")
    expected = sum(o["quantity"] * o["unit_price_cents"] for o in lines)
    total = sum(t["revenue_cents"] for t in result["regions"].values())
    print(f"total revenue {total / 100:,.2f} over {result['chunks']} chunks "
          f"({'matches' if total == expected else 'DOES NOT MATCH'} the order lines)")
    stem.close()


if __name__ == "__main__":
    main()
