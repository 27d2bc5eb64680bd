#!/usr/bin/env bash
# Sets up .venv if needed, then the main job: images from a few prompts with the shipped demo model
# (models/shapes-demo), first on the eager torch engine, then exported with `ldm-export --engine fp16`
# and sampled again from the engine dir on onnxruntime, without torch; then one picture of both side by side,
# enlarged and captioned (ldm-sheet). Everything goes to runs/main/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
cd "$root"
bin="$root/.venv/bin"
model="${LDM_MAIN_MODEL:-$root/models/shapes-demo}"
out="${LDM_MAIN_OUT:-runs/main}"
prompts=(
    "a large red circle on the left, on a blue background"
    "a small yellow star in the center, on a black background"
    "a green square at the top, on a white background"
    "a large purple triangle on the right, on a gray background"
)
"$bin/ldm-sample" --model "$model" "${prompts[@]}" --seed 0 --steps 25 --out "$out/torch"
"$bin/ldm-export" "$model" --out "$out/engine-fp16" --engine fp16 --force
"$bin/ldm-sample" --model "$out/engine-fp16" "${prompts[@]}" --seed 0 --steps 25 --out "$out/onnxruntime" \
    --engine onnxruntime
"$bin/ldm-sheet" --out "$out/compare.png" "eager PyTorch (the checkpoint)=$out/torch" \
    "ldm-export --engine fp16, onnxruntime=$out/onnxruntime"
echo "main: $out/compare.png shows the prompts' images side by side, eager and engine, with their captions;"
echo "main: the images are in $out/torch and $out/onnxruntime (grid.png in each), the fp16 engine dir in $out/engine-fp16"
