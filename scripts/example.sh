#!/usr/bin/env bash
# The README's main job, end to end and offline: fine-tune a pretrained backbone on new classes and show that the
# pretraining transfers.
#
#   fixtures/backbone/backbone.keras  a small Keras CNN pretrained on scikit-learn's digits 0-4
#                                     (fixtures/backbone/make_backbone.py)
#   fixtures/backbone/random.keras    the same architecture, randomly initialized, never trained
#
# Both are converted to ONNX (with parity), a new head is fine-tuned on digits 5-9 (an image folder written by
# examples/digits/prepare_data.py), both models classify the held-out test images with `porter predict`, and the
# test accuracies are printed side by side. Everything goes under out/example/; re-running replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=.venv/bin/python
PORTER=.venv/bin/porter
OUT=out/example
mkdir -p "$OUT"
export PORTER_CACHE="${PORTER_CACHE:-$OUT/cache}"

echo "== 1. data: digits 5-9 as PNG files, one folder per class, plus a held-out test folder"
"$PY" examples/digits/prepare_data.py "$OUT/digits" --force

echo "== 2. convert the backbones to ONNX (parity checked against Keras)"
"$PORTER" convert fixtures/backbone/backbone.keras -o "$OUT/backbone.onnx" --preprocess unit --force
"$PORTER" convert fixtures/backbone/random.keras -o "$OUT/random_backbone.onnx" --preprocess unit --force

echo "== 3. fine-tune a new head on digits 5-9 (pretrained backbone, then the random one)"
"$PORTER" finetune "$OUT/backbone.onnx" "$OUT/digits/train" -o "$OUT/digits.onnx" --force
"$PORTER" finetune "$OUT/random_backbone.onnx" "$OUT/digits/train" -o "$OUT/digits_random.onnx" --force --quiet

echo "== 4. predict the held-out test images"
"$PORTER" predict "$OUT/digits.onnx" "$OUT/digits/test" --format csv --top-k 1 > "$OUT/predictions.csv"
"$PORTER" predict "$OUT/digits_random.onnx" "$OUT/digits/test" --format csv --top-k 1 > "$OUT/predictions_random.csv"
"$PORTER" predict "$OUT/digits.onnx" $(ls "$OUT"/digits/test/7/*.png | head -3) --top-k 2 2>/dev/null

echo "== 5. test accuracy: fine-tuned pretrained backbone vs the same head on a random backbone"
"$PY" examples/digits/score.py "pretrained backbone (0-4)=$OUT/predictions.csv" \
    "random backbone=$OUT/predictions_random.csv"
