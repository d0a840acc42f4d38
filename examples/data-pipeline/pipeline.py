"""The tasks of the example data pipeline (examples/data-pipeline.yaml), one per shell step.

(Steps 17, "triage rejected rows", and 32, "rank regions", are agent steps: a model does them with tools.)

A small retail warehouse, end to end: generate raw extracts (with the usual defects), validate, clean, join,
aggregate, and build a report. Deterministic on purpose - seeded generators, no clocks, sorted outputs - so the
final workspace digest is identical on every run, crashed or not. Every task first appends its name to
log/steps.log, so a step that took effect twice would show.

Usage: python3 bin/pipeline.py TASK
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

CONFIG = json.loads(Path("config.json").read_text())
RAW, CLEAN, JOINED, OUT, REPORTS = (Path(p) for p in ("data/raw", "data/clean", "data/joined", "out", "reports"))
TASKS = {}


def task(fn):
    TASKS[fn.__name__.replace("_", "-")] = fn
    return fn


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path, rows, fields):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)")


def rng(name):
    return random.Random(f"{CONFIG['seed']}-{name}")


def money(x):
    return f"{x:.2f}"


# -- generate -----------------------------------------------------------------------------------------------


@task
def generate_customers():
    r = rng("customers")
    regions = [row["region"] for row in read(RAW / "regions.csv")]
    rows = []
    for i in range(1, CONFIG["customers"] + 1):
        email = f"Customer{i}@Example.COM" if r.random() > 0.02 else ""  # some lack an email
        rows.append({"customer_id": i, "name": f"Customer {i}", "email": email, "region": r.choice(regions)})
    rows.append(dict(rows[10]))  # a duplicate, as real extracts have
    write(RAW / "customers.csv", rows, ["customer_id", "name", "email", "region"])


@task
def generate_regions():
    rows = [
        {"region": "north", "country": "NO", "tax_rate": "0.25"},
        {"region": "south", "country": "ES", "tax_rate": "0.21"},
        {"region": "east", "country": "PL", "tax_rate": "0.23"},
        {"region": "west", "country": "PT", "tax_rate": "0.23"},
        {"region": "central", "country": "DE", "tax_rate": "0.19"},
    ]
    write(RAW / "regions.csv", rows, ["region", "country", "tax_rate"])


@task
def generate_products():
    r = rng("products")
    categories = ["books", "garden", "kitchen", "toys", "tools", "sports"]
    rows = []
    for i in range(1, CONFIG["products"] + 1):
        price = round(r.uniform(2, 300), 2) * (-1 if r.random() < 0.01 else 1)  # a few negative prices
        rows.append({"product_id": i, "category": r.choice(categories), "price": money(price)})
    write(RAW / "products.csv", rows, ["product_id", "category", "price"])


@task
def generate_orders():
    r = rng("orders")
    rows = []
    for i in range(1, CONFIG["orders"] + 1):
        month = r.randint(1, 12)
        date = f"2025-{month:02d}-{r.randint(1, 28):02d}" if r.random() > 0.01 else "2025-13-45"  # bad dates
        rows.append({"order_id": i, "customer_id": r.randint(1, CONFIG["customers"]), "date": date})
    write(RAW / "orders.csv", rows, ["order_id", "customer_id", "date"])


@task
def generate_order_lines():
    r = rng("lines")
    rows = []
    for order_id in range(1, CONFIG["orders"] + 1):
        for _ in range(r.randint(1, 5)):
            qty = r.randint(1, 6) if r.random() > 0.01 else r.randint(-3, 0)  # bad quantities
            rows.append({"order_id": order_id, "product_id": r.randint(1, CONFIG["products"]), "quantity": qty})
    rows.append({"order_id": CONFIG["orders"] + 99, "product_id": 1, "quantity": 1})  # an orphan line
    write(RAW / "order_lines.csv", rows, ["order_id", "product_id", "quantity"])


# -- validate and profile -----------------------------------------------------------------------------------

SCHEMAS = {
    "customers": ["customer_id", "name", "email", "region"],
    "products": ["product_id", "category", "price"],
    "orders": ["order_id", "customer_id", "date"],
    "order_lines": ["order_id", "product_id", "quantity"],
}


def validate(name):
    rows = read(RAW / f"{name}.csv")
    problems = []
    header = list(rows[0].keys()) if rows else []
    if header != SCHEMAS[name]:
        problems.append(f"header {header} != {SCHEMAS[name]}")
    for n, row in enumerate(rows, start=2):
        empty = [k for k, v in row.items() if v == ""]
        if empty:
            problems.append(f"line {n}: empty {','.join(empty)}")
    report = REPORTS / f"validate_{name}.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"{name}: {len(rows)} rows, {len(problems)} problems\n" + "\n".join(problems[:200]) + "\n")
    print(report.read_text().splitlines()[0])


for _name in SCHEMAS:
    TASKS[f"validate-{_name.replace('_', '-')}"] = lambda n=_name: validate(n)


@task
def profile_raw():
    profile = {}
    for name in SCHEMAS:
        rows = read(RAW / f"{name}.csv")
        profile[name] = {
            "rows": len(rows),
            "empty": {k: sum(1 for r in rows if r[k] == "") for k in SCHEMAS[name]},
            "distinct": {k: len({r[k] for r in rows}) for k in SCHEMAS[name]},
        }
    (REPORTS / "profile_raw.json").write_text(json.dumps(profile, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v["rows"] for k, v in profile.items()}))


# -- clean --------------------------------------------------------------------------------------------------


def reject(name, rows, reason):
    with open(REPORTS / "rejected.csv", "a", newline="") as f:
        for row in rows:
            f.write(f"{name},{reason},{json.dumps(row, sort_keys=True)}\n")


@task
def clean_customers():
    seen, kept, dropped = set(), [], []
    for row in read(RAW / "customers.csv"):
        if not row["email"] or row["customer_id"] in seen:
            dropped.append(row)
            continue
        seen.add(row["customer_id"])
        kept.append({**row, "email": row["email"].lower()})
    reject("customers", dropped, "no email or duplicate")
    write(CLEAN / "customers.csv", kept, SCHEMAS["customers"])


@task
def clean_products():
    rows = read(RAW / "products.csv")
    kept = [r for r in rows if float(r["price"]) > 0]
    reject("products", [r for r in rows if float(r["price"]) <= 0], "non-positive price")
    write(CLEAN / "products.csv", kept, SCHEMAS["products"])


@task
def clean_orders():
    customers = {r["customer_id"] for r in read(CLEAN / "customers.csv")}
    kept, dropped = [], []
    for row in read(RAW / "orders.csv"):
        _y, m, d = (int(x) for x in row["date"].split("-"))
        ok = 1 <= m <= 12 and 1 <= d <= 31 and row["customer_id"] in customers
        (kept if ok else dropped).append(row)
    reject("orders", dropped, "bad date or unknown customer")
    write(CLEAN / "orders.csv", kept, SCHEMAS["orders"])


@task
def clean_order_lines():
    orders = {r["order_id"] for r in read(CLEAN / "orders.csv")}
    products = {r["product_id"] for r in read(CLEAN / "products.csv")}
    kept, dropped = [], []
    for row in read(RAW / "order_lines.csv"):
        ok = int(row["quantity"]) > 0 and row["order_id"] in orders and row["product_id"] in products
        (kept if ok else dropped).append(row)
    reject("order_lines", dropped, "bad quantity or orphan")
    write(CLEAN / "order_lines.csv", kept, SCHEMAS["order_lines"])


# -- join ---------------------------------------------------------------------------------------------------


@task
def join_lines_products():
    products = {r["product_id"]: r for r in read(CLEAN / "products.csv")}
    rows = []
    for line in read(CLEAN / "order_lines.csv"):
        p = products[line["product_id"]]
        amount = int(line["quantity"]) * float(p["price"])
        rows.append({**line, "category": p["category"], "amount": money(amount)})
    write(JOINED / "lines_products.csv", rows, ["order_id", "product_id", "quantity", "category", "amount"])


@task
def join_orders():
    orders = {r["order_id"]: r for r in read(CLEAN / "orders.csv")}
    rows = [
        {**line, "customer_id": orders[line["order_id"]]["customer_id"], "date": orders[line["order_id"]]["date"]}
        for line in read(JOINED / "lines_products.csv")
    ]
    fields = ["order_id", "product_id", "quantity", "category", "amount", "customer_id", "date"]
    write(JOINED / "lines_orders.csv", rows, fields)


@task
def join_customers():
    customers = {r["customer_id"]: r for r in read(CLEAN / "customers.csv")}
    rows = [{**r, "region": customers[r["customer_id"]]["region"]} for r in read(JOINED / "lines_orders.csv")]
    fields = ["order_id", "product_id", "quantity", "category", "amount", "customer_id", "date", "region"]
    write(JOINED / "fact_sales.csv", rows, fields)


@task
def attach_regions():
    regions = {r["region"]: r for r in read(RAW / "regions.csv")}
    rows = []
    for r in read(JOINED / "fact_sales.csv"):
        gross = float(r["amount"]) * (1 + float(regions[r["region"]]["tax_rate"]))
        rows.append({**r, "country": regions[r["region"]]["country"], "gross": money(gross)})
    write(JOINED / "fact_sales_region.csv", rows, [*rows[0].keys()])


@task
def partition_by_month():
    """The heaviest step: split the fact table into monthly partitions with a per-partition index."""
    parts = defaultdict(list)
    for r in read(JOINED / "fact_sales_region.csv"):
        parts[r["date"][:7]].append(r)
    index = []
    for month, rows in sorted(parts.items()):
        rows.sort(key=lambda r: (r["date"], int(r["order_id"]), int(r["product_id"])))
        path = JOINED / "by_month" / f"{month}.csv"
        write(path, rows, [*rows[0].keys()])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        index.append({"month": month, "rows": len(rows), "sha256": digest})
    write(JOINED / "by_month" / "_index.csv", index, ["month", "rows", "sha256"])


# -- aggregate ----------------------------------------------------------------------------------------------


def facts():
    for part in sorted((JOINED / "by_month").glob("2025-*.csv")):
        yield from read(part)


def aggregate(key, out):
    totals = defaultdict(float)
    for r in facts():
        totals[key(r)] += float(r["amount"])
    rows = [{"key": k, "revenue": money(v)} for k, v in sorted(totals.items())]
    write(OUT / out, rows, ["key", "revenue"])


TASKS["revenue-by-month"] = lambda: aggregate(lambda r: r["date"][:7], "revenue_by_month.csv")
TASKS["revenue-by-region"] = lambda: aggregate(lambda r: r["region"], "revenue_by_region.csv")
TASKS["revenue-by-category"] = lambda: aggregate(lambda r: r["category"], "revenue_by_category.csv")


def top(field, out, n=20):
    totals = defaultdict(float)
    for r in facts():
        totals[r[field]] += float(r["amount"])
    best = sorted(totals.items(), key=lambda kv: (-kv[1], int(kv[0])))[:n]
    write(OUT / out, [{field: k, "revenue": money(v)} for k, v in best], [field, "revenue"])


TASKS["top-customers"] = lambda: top("customer_id", "top_customers.csv")
TASKS["top-products"] = lambda: top("product_id", "top_products.csv")


@task
def cohorts():
    first = {}
    for r in facts():
        month = r["date"][:7]
        first[r["customer_id"]] = min(first.get(r["customer_id"], month), month)
    counts = defaultdict(int)
    for month in first.values():
        counts[month] += 1
    write(
        OUT / "cohorts.csv", [{"cohort": k, "customers": v} for k, v in sorted(counts.items())], ["cohort", "customers"]
    )
    (OUT / "first_order.json").write_text(json.dumps(first, sort_keys=True) + "\n")


@task
def retention():
    first = json.loads((OUT / "first_order.json").read_text())
    active = defaultdict(set)
    for r in facts():
        active[r["date"][:7]].add(r["customer_id"])
    months = sorted(active)
    rows = []
    for cohort in months:
        members = {c for c, m in first.items() if m == cohort}
        row = {"cohort": cohort}
        for m in months:
            row[m] = f"{len(members & active[m]) / len(members):.3f}" if members and m >= cohort else ""
        rows.append(row)
    write(OUT / "retention.csv", rows, ["cohort", *months])


@task
def order_value():
    orders = defaultdict(float)
    month_of = {}
    for r in facts():
        orders[r["order_id"]] += float(r["amount"])
        month_of[r["order_id"]] = r["date"][:7]
    by_month = defaultdict(list)
    for order, total in orders.items():
        by_month[month_of[order]].append(total)
    rows = [
        {"month": m, "orders": len(v), "avg_order_value": money(sum(v) / len(v))} for m, v in sorted(by_month.items())
    ]
    write(OUT / "order_value.csv", rows, ["month", "orders", "avg_order_value"])


@task
def anomalies():
    rows = read(OUT / "revenue_by_month.csv")
    values = [float(r["revenue"]) for r in rows]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0
    flagged = [
        {"month": r["key"], "revenue": r["revenue"], "z": f"{(float(r['revenue']) - mean) / sd:.2f}"} for r in rows
    ]
    write(OUT / "monthly_zscores.csv", flagged, ["month", "revenue", "z"])


# -- report -------------------------------------------------------------------------------------------------


@task
def reconcile():
    totals = {
        name: round(sum(float(r["revenue"]) for r in read(OUT / f"revenue_by_{name}.csv")), 2)
        for name in ("month", "region", "category")
    }
    if len(set(totals.values())) != 1:
        sys.exit(f"totals do not reconcile: {totals}")
    (REPORTS / "reconcile.json").write_text(json.dumps(totals, sort_keys=True) + "\n")
    print(f"all totals agree: {totals['month']}")


@task
def build_report():
    totals = json.loads((REPORTS / "reconcile.json").read_text())
    lines = ["# Retail warehouse report (2025)", "", f"Total revenue: **{totals['month']:.2f}**", ""]
    for title, name in [("By region", "revenue_by_region"), ("By category", "revenue_by_category")]:
        lines += [f"## {title}", "", "| key | revenue |", "|---|---|"]
        lines += [f"| {r['key']} | {r['revenue']} |" for r in read(OUT / f"{name}.csv")] + [""]
    lines += ["## Top customers", ""] + [
        f"- {r['customer_id']}: {r['revenue']}" for r in read(OUT / "top_customers.csv")[:5]
    ]
    (REPORTS / "report.md").write_text("\n".join(lines) + "\n")


@task
def render_html():
    body = []
    for line in (REPORTS / "report.md").read_text().splitlines():
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    (REPORTS / "report.html").write_text("<!doctype html><meta charset=utf-8>\n" + "\n".join(body) + "\n")


@task
def file_manifest():
    lines = []
    for root, dirs, files in os.walk("."):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)[2:]
            if path.startswith("log/") or path == "out/MANIFEST.txt":
                continue
            lines.append(
                f"{os.path.getsize(path):>10}  {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}  {path}"
            )
    (OUT / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} files")


@task
def audit():
    ran = (Path("log") / "steps.log").read_text().splitlines()
    if len(ran) != len(set(ran)):
        sys.exit(f"a step ran twice: {sorted(x for x in ran if ran.count(x) > 1)}")
    (REPORTS / "audit.txt").write_text(f"{len(ran)} steps, each exactly once\n")
    print((REPORTS / "audit.txt").read_text().strip())


def main():
    name = sys.argv[1]
    if name not in TASKS:
        sys.exit(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    with open("log/steps.log", "a") as log:  # first, so a step that ran twice would show
        log.write(name + "\n")
    TASKS[name]()


if __name__ == "__main__":
    main()
