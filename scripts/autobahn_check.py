#!/usr/bin/env python3
"""Checks an Autobahn index.json: every case OK, NON-STRICT or INFORMATIONAL, the
permessage-deflate sections 12.* and 13.* included. Writes a per-section summary in Markdown."""
import collections
import json
import sys

ALLOWED = {"OK", "NON-STRICT", "INFORMATIONAL"}


def main(index_path, summary_path):
    with open(index_path) as f:
        index = json.load(f)
    counts = collections.Counter()
    bad = []
    total = 0
    for agent, cases in index.items():
        for case, r in cases.items():
            total += 1
            section = case.split(".")[0]
            b, bc = r["behavior"], r.get("behaviorClose", "OK")
            counts[(int(section), b)] += 1
            ok = b in ALLOWED and bc in ALLOWED | {"UNIMPLEMENTED"}
            if not ok:
                bad.append(f"{case}: behavior={b} behaviorClose={bc}")
    lines = [
        "# Autobahn TestSuite summary",
        "",
        f"Server: `switchboard --echo --deflate --deflate-min-bytes 0 --max-message-bytes 16777216 "
        f"--max-outbound-bytes 67108864`; "
        f"client: kosoku (`scripts/autobahn.sh`). {total} cases.",
        "",
        "| section | verdict | cases |",
        "|---|---|---|",
    ]
    for (section, b), n in sorted(counts.items()):
        lines.append(f"| {section} | {b} | {n} |")
    lines.append("")
    lines.append("Failures: " + (", ".join(bad) if bad else "none") + ".")
    with open(summary_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if total != 517:
        print(f"expected 517 cases, got {total}", file=sys.stderr)
        return 1
    if bad:
        print(f"{len(bad)} cases not acceptable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
