#!/usr/bin/env bash
# Sets up .venv if needed, then the main job: a short end-to-end training run of both stages
# (autoencoder, then text-conditional UNet) on the built-in shapes data, into runs/main/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
cd "$root"
train=("$root/.venv/bin/ldm-train")
out="${LDM_MAIN_OUT:-runs/main}"
"${train[@]}" autoencoder --preset shapes --data shapes:2048 --out "$out/autoencoder" --steps 300 \
    --batch-size 16 --learning-rate 5e-4 --disc-start 200 --checkpoint-every 100 --sample-every 100 --overwrite
"${train[@]}" unet --autoencoder "$out/autoencoder" --preset shapes --data shapes:2048 --out "$out/ldm" \
    --steps 300 --batch-size 32 --checkpoint-every 100 --sample-every 100 --overwrite
echo "main: checkpoints in $out/autoencoder and $out/ldm; sample grids in */samples; losses in */metrics.jsonl"
