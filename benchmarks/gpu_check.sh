#!/usr/bin/env bash
# One command for a fresh GPU machine (~10 minutes): install what is missing from wheels carried in the working
# tree, then check every GPU path and measure, writing every result as JSON into one folder.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR] [--site DIR] [--only STEPS] [--bench-steps N]
#                                [--budget SECONDS] [--python PY] [--require MODULE:DISTRIBUTION ...]
#
# Steps (all by default; --only install,env,doctor,pytest,bench picks some):
#   install  import every runtime module qlora-kit needs (and each --require); install the missing ones from
#            --wheels (default .whl/, filled on a connected machine by ../shared/tools/gpu-wheels.sh) into --site with
#            `pip install --no-index --no-deps --target`, and put it and the repository on PYTHONPATH
#            -> install.json (installed / already present / still missing)
#   env      python, torch, CUDA, the GPU (nvidia-smi)                      -> environment.json
#   doctor   qlora-kit doctor --gpu --json                                  -> doctor-gpu.json
#   pytest   pytest -m gpu (the GPU-marked tests)                           -> pytest-gpu.json (+ pytest-gpu.xml)
#   bench    benchmarks/train_bench.py: the Llama-3.1-8B shape at 2,048 tokens under a 24 GiB cap, qlora-kit
#            against the stock trl recipe, chat rows                        -> train-bench-llama-3.1-8b.json
#   summary  every step's status, exit code and seconds                     -> summary.json
# Without CUDA the GPU steps are recorded as skipped (doctor still writes its one-line JSON).
# Output folder: --out, else $OUT, else benchmarks/results/gpu-check-<UTC time>.
# Exit status: 0 when every step that ran succeeded, 1 when one failed, 2 on bad arguments.
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_check.sh: $1" >&2; echo "usage: bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR]" \
  "[--site DIR] [--only install,env,doctor,pytest,bench] [--bench-steps N] [--budget SECONDS] [--python PY]" \
  "[--require MODULE:DISTRIBUTION]" >&2
  exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-}
wheels="$repo/.whl"
site="${TMPDIR:-/tmp}/qlora-kit-site"
only="install,env,doctor,pytest,bench"
bench_steps=8
budget=570
py=python3
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out|--wheels|--site|--only|--bench-steps|--budget|--python|--require)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
      case "$1" in
        --out) out=$2 ;; --wheels) wheels=$2 ;; --site) site=$2 ;; --only) only=$2 ;;
        --bench-steps) bench_steps=$2 ;; --budget) budget=$2 ;; --python) py=$2 ;;
        --require) [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z0-9_.-]+$ ]] || die "--require wants MODULE:DISTRIBUTION"
                   extra+=("$2") ;;
      esac
      shift 2 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
for step in ${only//,/ }; do
  case "$step" in install|env|doctor|pytest|bench) ;; *) die "--only: unknown step '$step'" ;; esac
done
[[ "$bench_steps" =~ ^[0-9]+$ ]] && [ "$bench_steps" -ge 3 ] || die "--bench-steps must be a whole number >= 3"
[[ "$budget" =~ ^[0-9]+$ ]] && [ "$budget" -ge 60 ] || die "--budget must be a whole number of seconds >= 60"
command -v "$py" >/dev/null 2>&1 || die "--python: '$py' not found"
[ -n "$out" ] || out="$repo/benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out" || die "cannot create the output folder $out"
out=$(cd "$out" && pwd)
steps_file="$out/.steps.tsv"
: > "$steps_file"
started=$(date +%s)
deadline=$((started + budget))
wants() { [[ ",$only," == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >> "$steps_file"; }  # name status rc s file why
left() { echo $((deadline - $(date +%s))); }

# Run one step with a time limit: run_step NAME FILE CAP -- command...
run_step() {
  local name=$1 file=$2 cap=$3; shift 4
  local limit; limit=$(left); [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 20 ]; then record "$name" skipped "" 0 "$file" "out of time (--budget $budget s)"; return; fi
  echo "== $name (at most ${limit} s): $*" >&2
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local status=ok why=""
  [ "$rc" -eq 0 ] || status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after $limit s"
  record "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$file" "$why"
  tail -n 3 "$out/$name.log" >&2
}

# ------------------------------------------------------------------ install
# import name -> distribution (the wheel's name): qlora-kit's runtime dependencies, pytest, and datasets' small ones
modules="torch:torch transformers:transformers peft:peft accelerate:accelerate bitsandbytes:bitsandbytes trl:trl
datasets:datasets safetensors:safetensors tokenizers:tokenizers huggingface_hub:huggingface_hub filelock:filelock
pydantic:pydantic yaml:pyyaml typer:typer rich:rich matplotlib:matplotlib psutil:psutil numpy:numpy pytest:pytest
dill:dill multiprocess:multiprocess xxhash:xxhash ${extra[*]:-}"
# Prints the distributions (of "module:distribution" pairs) whose module cannot be imported: one process for all.
missing_of() { "$py" - $modules 2>/dev/null <<'EOF'
import importlib, sys
for pair in sys.argv[1:]:
    module, dist = pair.split(":")
    try:
        importlib.import_module(module)
    except Exception:
        print(dist)
EOF
}
if wants install; then
  t0=$(date +%s)
  missing=() present=() installed=() unresolved=()
  mapfile -t missing < <(missing_of)
  for pair in $modules; do
    dist=${pair##*:}
    [[ " ${missing[*]:-} " == *" $dist "* ]] || present+=("$dist")
  done
  found=()
  for dist in "${missing[@]}"; do
    norm=$(echo "$dist" | tr 'A-Z.-' 'a-z__')
    wheel=$(ls "$wheels"/*.whl 2>/dev/null | while read -r w; do  # a wheel's name ends at its first '-'
      name=$(basename "$w"); name=$(echo "${name%%-*}" | tr 'A-Z.-' 'a-z__'); [ "$name" = "$norm" ] && echo "$w"
    done | sort -V | tail -n 1)
    if [ -n "$wheel" ]; then found+=("$wheel"); installed+=("$dist"); else unresolved+=("$dist"); fi
  done
  rc=0
  if [ ${#found[@]} -gt 0 ]; then
    mkdir -p "$site"
    echo "== install: ${installed[*]} from $wheels into $site" >&2
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${found[@]}" \
      > "$out/install.log" 2>&1 || rc=$?
  fi
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
  still=()
  mapfile -t still < <(missing_of)
  "$py" - "$out/install.json" "$wheels" "$site" "$rc" "${present[*]:-}" "${installed[*]:-}" "${still[*]:-}" <<'EOF'
import json, sys
path, wheels, site, rc, present, installed, still = sys.argv[1:8]
doc = {"wheels": wheels, "site": site, "pip_exit_code": int(rc), "already_present": present.split(),
       "installed": installed.split(), "missing": still.split()}
if still.split():
    doc["fix"] = ("on a connected machine, in the repository: ../shared/tools/gpu-wheels.sh " + " ".join(still.split())
                  + " ; then carry .whl/ to this machine")
json.dump(doc, open(path, "w"), indent=2)
EOF
  status=ok; why=""
  if [ "$rc" -ne 0 ] || [ ${#still[@]} -gt 0 ]; then status=failed; why="missing: ${still[*]:-} (pip exit $rc)"; fi
  record install "$status" "$rc" $(( $(date +%s) - t0 )) install.json "$why"
else
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# ------------------------------------------------------------------ env
if wants env; then
  run_step env environment.json 60 -- "$py" - "$out/environment.json" <<'EOF'
import json, platform, shutil, subprocess, sys
doc = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    doc.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        doc["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                      "count": torch.cuda.device_count()}
except Exception as exc:
    doc["torch_error"] = f"{type(exc).__name__}: {exc}"
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    doc["nvidia_smi"] = q.stdout.strip().splitlines()
json.dump(doc, open(sys.argv[1], "w"), indent=2)
EOF
fi

# ------------------------------------------------------------------ doctor
if wants doctor; then
  run_step doctor doctor-gpu.json 150 -- "$py" -m qlora_kit.cli doctor --gpu --json "$out/doctor-gpu.json"
fi

# ------------------------------------------------------------------ pytest -m gpu
if wants pytest; then
  if [ "$cuda" = 1 ]; then
    run_step pytest pytest-gpu.json 210 -- "$py" -m pytest -m gpu -q -p no:cacheprovider "$repo/tests" \
      --junitxml "$out/pytest-gpu.xml"
  else
    record pytest skipped "" 0 pytest-gpu.json "no CUDA GPU"
  fi
  "$py" - "$out/pytest-gpu.xml" "$out/pytest-gpu.json" "$cuda" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
xml, path, cuda = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
doc = {"ran": False, "reason": "no CUDA GPU"} if not cuda else {"ran": False, "reason": "no JUnit XML written"}
if cuda and os.path.exists(xml):
    suites = ET.parse(xml).getroot()
    cases = suites.iter("testcase")
    doc = {"ran": True, "passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            doc["failed"] += 1
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            doc["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif case.find("skipped") is not None:
            doc["skipped"] += 1
            doc["skips"].append({"test": name, "reason": (case.find("skipped").get("message") or "")[:200]})
        else:
            doc["passed"] += 1
json.dump(doc, open(path, "w"), indent=2)
EOF
fi

# ------------------------------------------------------------------ the 8B benchmark
if wants bench; then
  if [ "$cuda" = 1 ]; then
    run_step bench train-bench-llama-3.1-8b.json 480 -- "$py" "$repo/benchmarks/train_bench.py" \
      --shape llama-3.1-8b --seq-len 2048 --micro-batch-size 1 --mix chat --steps "$bench_steps" \
      --warmup-steps 2 --cap-gib 24 --recipes qlora-kit,stock --max-len-search off \
      --out "$out/train-bench-llama-3.1-8b.json"
  else
    record bench skipped "" 0 train-bench-llama-3.1-8b.json "no CUDA GPU"
  fi
fi

# ------------------------------------------------------------------ summary
"$py" - "$steps_file" "$out/summary.json" "$started" "$cuda" "$out" <<'EOF'
import json, os, sys, time
steps_file, path, started, cuda, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
steps = {}
for line in open(steps_file):
    name, status, rc, seconds, result, why = line.rstrip("\n").split("\t")
    steps[name] = {"status": status, "exit_code": int(rc) if rc else None, "seconds": int(seconds),
                   "result": result if os.path.exists(os.path.join(out, result)) else None,
                   **({"why": why} if why else {})}
failed = [n for n, s in steps.items() if s["status"] == "failed"]
doc = {"command": "benchmarks/gpu_check.sh", "cuda": cuda, "seconds": int(time.time()) - started,
       "ok": not failed, "failed": failed, "steps": steps}
json.dump(doc, open(path, "w"), indent=2)
print(json.dumps({k: doc[k] for k in ("cuda", "seconds", "ok", "failed")}))
sys.exit(1 if failed else 0)
EOF
rc=$?
rm -f "$steps_file"
echo "results: $out" >&2
exit $rc
