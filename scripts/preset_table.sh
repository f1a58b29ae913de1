#!/usr/bin/env bash
# Trains every shipped preset on its embedded task (selective copying) with its own settings and
# prints the README's preset table: eval accuracy at the end of training and wall time.
#   bash scripts/preset_table.sh [layouts/*.yaml ...]
# CPU figures depend on the machine and its load: the table says which machine it ran on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
layouts=("$@")
if [ ${#layouts[@]} -eq 0 ]; then
  # every preset with an embedded task; a layout that trains on a prepared text folder is left out
  for f in layouts/*.yaml; do grep -qE '^\s*task:.*name: text\b' "$f" || layouts+=("$f"); done
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "| preset | parameters | steps | eval accuracy | wall time |"
echo "|---|---|---|---|---|"
for f in "${layouts[@]}"; do
  name=$(basename "$f" .yaml)
  python -m hybridseq train "$f" --out "$tmp/$name" --no-progress --json > "$tmp/$name.json" 2> "$tmp/$name.err"
  python - "$tmp/$name.json" "$name" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {s['n_params']:,} | {s['steps']} | {s['eval_acc']:.3f} | {s['wall_s']:.0f} s |")
PY
done
echo
echo "machine: $(nproc) cores, $(python -c 'import torch; print("torch", torch.__version__)'), load $(cut -d' ' -f1-3 /proc/loadavg)"
