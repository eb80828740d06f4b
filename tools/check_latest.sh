#!/usr/bin/env bash
# Drift check: the test suite against the newest releases of the test stack, beside the lock.
#
#     bash tools/check_latest.sh            # report what moved and what broke
#     bash tools/check_latest.sh --write    # also move constraints.txt to what passed
#
# Builds a scratch venv (SCRATCH, default /tmp/drift-latest-venv) with torch==2.13.0 (the CPU
# wheel CI uses) and the newest releases of everything else the ".[test]" extra pulls in,
# prints every package whose version differs from constraints.txt, runs the suite
# (PYTEST_ARGS, default -q) and prints its last lines. With --write and a green suite it
# rewrites constraints.txt from that environment. Exit status: the suite's.
set -uo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-/tmp/drift-latest-venv}
WRITE=0
[ "${1:-}" = "--write" ] && WRITE=1

rm -rf "$SCRATCH"
python -m venv "$SCRATCH"
"$SCRATCH/bin/pip" install -q --upgrade torch==2.13.0 -e ".[test]" || { echo "drift check: install failed"; exit 2; }
"$SCRATCH/bin/pip" freeze --exclude-editable | grep -v -E '^(torch|runlora[-_]fx)==' | sort -f >"$SCRATCH/latest.txt"
grep -v -E '^\s*(#|$)' constraints.txt | sort -f >"$SCRATCH/locked.txt"

echo "== versions: lock -> newest =="
python - "$SCRATCH/locked.txt" "$SCRATCH/latest.txt" <<'PY'
import sys
def read(path):
    return {line.split("==")[0].lower().replace("_", "-"): line.strip().split("==")[1]
            for line in open(path) if "==" in line}
locked, latest = read(sys.argv[1]), read(sys.argv[2])
moved = [(k, locked.get(k, "-"), latest.get(k, "-")) for k in sorted(set(locked) | set(latest))
         if locked.get(k) != latest.get(k)]
for name, old, new in moved:
    print(f"  {name:<28} {old:>14} -> {new}")
print(f"  {len(moved)} moved" if moved else "  nothing moved")
PY

echo "== suite on the newest releases =="
"$SCRATCH/bin/python" -m pytest ${PYTEST_ARGS:--q} -p no:cacheprovider 2>&1 | tee "$SCRATCH/pytest.log" | tail -n 25
status=${PIPESTATUS[0]}
if [ "$status" -eq 0 ] && [ "$WRITE" = 1 ]; then
    { echo "# The test stack CI installs (README's test command, .ci/run): exact versions known to pass."
      echo "# torch is pinned on the command line (torch==2.13.0). Refresh: bash tools/check_latest.sh --write"
      echo "# Last checked: $(date -u +%F), $("$SCRATCH/bin/python" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])')"
      cat "$SCRATCH/latest.txt"; } >constraints.txt
    echo "drift check: constraints.txt moved to the newest releases"
fi
[ "$status" -eq 0 ] && echo "drift check: green on the newest releases" || echo "drift check: FAILED on the newest releases (lock unchanged)"
exit "$status"
