#!/usr/bin/env bash
# Check a GPU machine (README, "Checking a GPU machine"): install, the CUDA tests, the step benchmark,
# a 40-epoch Part A run on generated data, a 6-trial sweep with 1 and with 3 workers. Every result is
# JSON under $OUT (default gpu_check/); summary.json gathers them. A failing step is recorded and the
# next one runs. Sized for about 8 minutes on an H100-class GPU: an estimate, not yet measured.
#   bash tools/gpu_check.sh            OUT=/some/folder bash tools/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu_check}")
if ! mkdir -p "$OUT" || ! : > "$OUT/steps.jsonl"; then
    echo "error: cannot write to $OUT; set OUT to a folder you can write" >&2
    exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT  # the generated data and runs, also after Ctrl-C
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

timed() {  # timed NAME COMMAND...: runs it, logging to NAME.log; its exit code and seconds go to steps.jsonl
    local name=$1 start=$SECONDS
    shift
    "$@" > "$OUT/$name.log" 2>&1
    local code=$? seconds=$((SECONDS - start))
    echo "{\"step\": \"$name\", \"exit_code\": $code, \"seconds\": $seconds}" >> "$OUT/steps.jsonl"
    echo "$name: exit $code after $seconds s"
}

timed install pip install -r requirements-dev.txt
timed cuda_tests python - "$OUT/cuda_tests.json" <<'EOF'
import json, sys, pytest
outcomes = {}
class Record:
    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            outcomes[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
code = pytest.main(["-m", "cuda", "-q", "-p", "no:cacheprovider"], plugins=[Record()])
json.dump({"exit_code": int(code), "tests": outcomes}, open(sys.argv[1], "w"), indent=1)
sys.exit(code)
EOF
timed bench_part_a sh -c "python common/bench.py step --models part_a --batch_sizes 32,256 \
    > '$OUT/bench_step_part_a.json'"
timed bench_resnet50 sh -c "python common/bench.py step --models resnet50 --batch_sizes 32,256 \
    --variants eager,graphs > '$OUT/bench_step_resnet50.json'"
# The real dataset's layout and counts (8,000 training images after the split); content is random.
timed data python -c "import sys; from pathlib import Path; from common.bench_data import generate; \
    from common.data import prepare; generate(Path(sys.argv[1]), 9999, 2000); prepare(sys.argv[1])" \
    "$WORK/data"
timed part_a_40_epochs python part_a/train.py --data_dir "$WORK/data" --out_dir "$WORK/runs" --name a40 --test
cp "$WORK/runs/a40/summary.json" "$OUT/part_a_40_epochs.json" 2>/dev/null
for workers in 1 3; do
    timed "sweep_workers_$workers" python common/sweep.py sweep.yaml --count 6 --workers "$workers" \
        --study "gpu_check_w$workers" --data_dir "$WORK/data" --out_dir "$WORK/sweep_w$workers" --seed 0 \
        --set epochs=2
done

python - "$OUT" "$WORK" <<'EOF'
import json, sys
from pathlib import Path
out, work = Path(sys.argv[1]), Path(sys.argv[2])
steps = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
summary = {"steps": steps}
for path in sorted(set(out.glob("*.json")) - {out / "summary.json"}):
    summary[path.stem] = json.loads(path.read_text())
for workers in (1, 3):  # finished 2-epoch trials per hour of the sweep's wall time, and their training times
    trials = [json.loads(p.read_text()) for p in (work / f"sweep_w{workers}").glob("*/trial_*/summary.json")]
    finished = [t for t in trials if t.get("status") == "finished"]
    seconds = steps.get(f"sweep_workers_{workers}", {}).get("seconds") or 1
    summary[f"sweep_workers_{workers}"] = {"finished": len(finished), "trials": len(trials),
                                           "trials_per_hour": 3600 * len(finished) / seconds,
                                           "train_time_s": [t["train_time_s"] for t in finished]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"results: {out}/summary.json")
EOF
