"""Chunked perplexity of `kvtune fit`'s validation windows for one cache configuration (the LoCoCo ablation's rows).

    python scripts/lococo_val_ppl.py full
    python scripts/lococo_val_ppl.py h2o [--normalize]
    python scripts/lococo_val_ppl.py lococo [--normalize]       # the quickstart recipe's untrained compressor
    python scripts/lococo_val_ppl.py lococo method.score_window=1 # ... with overrides of the recipe
    python scripts/lococo_val_ppl.py tova                        # any training-free method at --budget
    python scripts/lococo_val_ppl.py lococo --adapter RUN/adapter # a trained adapter (a run stopped by max_time)

The windows are the quickstart recipe's validation windows (held-out `stdlib_train` documents, 4,096 tokens), scored
as `kvtune eval task=perplexity` scores (`kvtune.eval.runner.chunked_nll`, chunks of 512, first chunk unscored), so
rows line up with `kvtune fit`'s ``val/ppl``. Prints one JSON row.
"""

from __future__ import annotations

import argparse
import json
import math


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="full, lococo, or a training-free method name")
    parser.add_argument("--normalize", action="store_true", help="normalised column scores")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--adapter", help="a saved LoCoCo adapter instead of the recipe's untrained compressor")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the quickstart recipe (lococo)")
    args = parser.parse_args()
    from hydra import compose, initialize_config_dir
    from lightning.pytorch import seed_everything

    import kvtune
    from kvtune.cli import CONF_DIR
    from kvtune.eval.runner import chunked_nll
    from kvtune.train.data import TextDataModule
    from kvtune.train.fit import build_adapted_model

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="fit",
            overrides=["recipe=quickstart", f"method.normalize_scores={args.normalize}", *args.overrides],
        )
    model, tokenizer = kvtune.load_model("embedded")
    block = cfg.method.block_size
    data = TextDataModule(
        tokenizer,
        block * cfg.data.chunks,
        source=cfg.data.source,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        max_train_sequences=1,
        val_length=cfg.data.val_length,
        val_source=cfg.data.val_source,
    )
    data.setup()
    name, kwargs = args.method, {"budget": args.budget, **({"normalize": True} if args.normalize else {})}
    if args.method == "lococo":
        if args.adapter:
            model = kvtune.load_adapter(model, args.adapter)
        else:
            seed_everything(cfg.seed)  # as `kvtune fit` does before building the compressors: its step-0 weights
            model = build_adapted_model(cfg, model, tokenizer)[0]
        kwargs = {"chunk": block}
    nlls = []
    for window in data.val_set.data[: args.windows]:
        policy = None if name == "full" else kvtune.methods.build(name, **kwargs)
        losses, _ = chunked_nll(model, kvtune.new_cache(model, policy), window[None], block)
        nlls.append(float(losses[:, block - 1 :].mean()))
    row = {
        "method": args.method,
        "normalize": args.normalize,
        "overrides": args.overrides,
        "adapter": args.adapter,
        "budget": None if args.method == "full" else args.budget,
        "windows": [math.exp(n) for n in nlls],
        "val_ppl": math.exp(sum(nlls) / len(nlls)),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
