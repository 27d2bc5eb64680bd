"""Does an adapter from ``ldm-train lora`` teach the model a new word, and what does it cost the rest?

The adapter was trained with captions where one background colour is always called by an invented word (e.g.
``--caption-replace "green background=zorp background" --caption-replace "green backdrop=zorp backdrop"``). This
script fuses it into the base model (``ldm-import --lora``'s code, scale 1) and measures, with the shipped
attribute classifier as judge, on held-out prompts (``ShapesDataset.heldout``: layouts never trained on):

- the word: prompts whose background is that colour, stated with the word instead; the fraction of images whose
  background the judge calls that colour, with the adapter and without it (the base model never saw the word);
- the rest: ldm-eval's adherence on the ordinary held-out prompts, with and without the adapter.

    python benchmarks/lora_new_word.py --base models/shapes-demo --adapter runs/zorp.safetensors \\
        --replace "green background=zorp background" --replace "green backdrop=zorp backdrop" --colour green \\
        --json benchmarks/results/cpu-lora-new-word.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm_export.lora import AdapterFile, fuse_checkpoint  # noqa: E402
from ldm_runtime.engines.torch_engine import TorchEngine  # noqa: E402
from ldm_tools.bench.cli import machine_info  # noqa: E402
from ldm_tools.evaluate import adherence, background_stated, generate_images, load_judge  # noqa: E402
from ldm_train.classifier import classify  # noqa: E402
from ldm_train.data.shapes import ShapesDataset  # noqa: E402
from ldm_train.train_lora import caption_replacements, rewrite_caption  # noqa: E402


def judged(engine, classifier, captions, seeds, steps, guidance, batch_size) -> list:
    images = generate_images(engine, captions, seeds, steps, guidance, 0.0, batch_size, "ddim")
    return classify(classifier, images)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--replace", action="append", required=True, metavar="OLD=NEW")
    parser.add_argument("--colour", required=True, help="the background colour the word stands for")
    parser.add_argument("--classifier", default=str(REPO / "models" / "shapes-classifier"))
    parser.add_argument("--word-prompts", type=int, default=100)
    parser.add_argument("--num-prompts", type=int, default=200, help="ordinary held-out prompts (ldm-eval's)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    replacements = caption_replacements(tuple(args.replace))
    classifier, _ = load_judge(args.classifier)

    with tempfile.TemporaryDirectory() as scratch:
        fused_dir = fuse_checkpoint(Path(args.base), Path(scratch) / "fused", [AdapterFile(Path(args.adapter), 1.0)])
        engines = {"base": TorchEngine(args.base, device="cpu"), "adapter": TorchEngine(fused_dir, device="cpu")}
        size = engines["base"].info.image_size

        # the word: held-out prompts stating the colour's background, the colour named by the word instead
        pool = ShapesDataset.heldout(40 * args.word_prompts, size, args.data_seed + 1)
        picked = [i for i in range(len(pool)) if pool.labels(i).background == args.colour
                  and background_stated(pool.caption(i), pool.labels(i))][:args.word_prompts]
        if len(picked) < args.word_prompts:
            raise SystemExit(f"only {len(picked)} held-out prompts state a {args.colour} background")
        truths = [pool.labels(i) for i in picked]
        stated = [pool.caption(i) for i in picked]
        worded = [rewrite_caption(caption, replacements) for caption in stated]
        assert all(worded[k] != stated[k] for k in range(len(picked))), "a replacement must change every prompt"
        seeds = list(range(len(picked)))
        word = {}
        for name, engine in engines.items():
            predictions = judged(engine, classifier, worded, seeds, args.steps, args.guidance, args.batch_size)
            fractions, _, _ = adherence(predictions, truths, stated)  # judged as if the colour had been named
            word[name] = {"background_is_colour": round(float(np.mean([p.background == args.colour
                                                                         for p in predictions])), 4),
                          "adherence": {key: round(value, 4) for key, value in fractions.items()}}
            print(f"{name}: word prompts -> {args.colour} background {word[name]['background_is_colour']:.3f}",
                  file=sys.stderr)

        # the rest: ldm-eval's ordinary held-out prompts
        ordinary = ShapesDataset.heldout(args.num_prompts, size, args.data_seed)
        captions = [ordinary.caption(i) for i in range(args.num_prompts)]
        labels = [ordinary.labels(i) for i in range(args.num_prompts)]
        seeds = list(range(args.num_prompts))
        rest = {}
        for name, engine in engines.items():
            predictions = judged(engine, classifier, captions, seeds, args.steps, args.guidance, args.batch_size)
            fractions, _, _ = adherence(predictions, labels, captions)
            rest[name] = {key: round(value, 4) for key, value in fractions.items()}
            print(f"{name}: ordinary prompts adherence {rest[name]}", file=sys.stderr)

    report = {
        "machine": machine_info(),
        "settings": {**vars(args), "sampler": "ddim", "engine": "torch fp32 cpu",
                     "word_prompts_from": f"ShapesDataset.heldout({40 * args.word_prompts}, {size}, "
                                          f"seed={args.data_seed + 1}), those stating a {args.colour} background",
                     "ordinary_prompts_from": f"ShapesDataset.heldout({args.num_prompts}, {size}, "
                                              f"seed={args.data_seed})"},
        "adapter_bytes": Path(args.adapter).stat().st_size,
        "word": word,
        "ordinary_adherence": rest,
        "ordinary_adherence_change": {key: round(rest["adapter"][key] - rest["base"][key], 4)
                                      for key in rest["base"]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("word", "ordinary_adherence_change")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
