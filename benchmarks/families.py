"""Does the quick recipe train every family? One short run each on the embedded digits.

ResNet-18, EfficientNet-B0, ConvNeXt (timm convnext_atto) and a ViT (timm's ViT with 4x4
patches at 32x32, width 96, 6 blocks, mean-pooled tokens; its two halves named with
--stages; `--families ViT-Tiny` for timm's ViT-Tiny with 4x4 patches) are converted with N procedures and trained
with the quick recipe, cut to --epochs (of which --stem-epochs stem). For each: the test
accuracy against chance (always guessing the most frequent class), whether the run was
flagged at chance, and the first and last epochs' training loss. Writes OUT.json and
OUT.csv and prints a Markdown table; exits 1 if any family ends at chance.

    python benchmarks/families.py -o out/families                        # about 15 minutes on 2 CPU cores
    python benchmarks/families.py --optimizer adamw --lr 2e-3 --weight-decay 0.05 -o out/families_adamw
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import timm
from results import write_rows  # benchmarks/results.py, beside this script
from rmn_fx.recipes.config import RunConfig
from rmn_fx.recipes.trainer import train
from torch import nn

from rmn_fx.errors import RMNError

FAMILIES = {  # family -> (model, conversion settings)
    "ResNet": ("resnet18", {}),
    "EfficientNet": ("efficientnet_b0", {}),
    "ConvNeXt": ("timm:convnext_atto", {}),
    "ViT": ("families:vit_d96_patch4_32", {"stages": "blocks.0:blocks.2,blocks.3:blocks.5"}),
    "ViT-Tiny": ("families:vit_tiny_patch4_32", {"stages": "blocks.0:blocks.5,blocks.6:blocks.11"}),
}
DEFAULT_FAMILIES = ["ResNet", "EfficientNet", "ConvNeXt", "ViT"]


def vit_d96_patch4_32(num_classes: int = 10) -> nn.Module:
    """A ViT sized for 32x32 images and a CPU: 4x4 patches (64 tokens), width 96, 6 blocks of
    3 heads, tokens mean-pooled for the head (no class token), timm's architecture otherwise."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
        global_pool="avg", class_token=False, num_classes=num_classes,
    )  # fmt: skip


def vit_tiny_patch4_32(num_classes: int = 10) -> nn.Module:
    """ViT-Tiny for 32x32 images: 4x4 patches (64 tokens), timm's architecture otherwise."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=num_classes)


def run_one(family: str, args, folder: str) -> dict:
    model, settings = FAMILIES[family]
    overrides = {"epochs": args.epochs, "stem_epochs": args.stem_epochs, "optimizer": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay}
    config = RunConfig.create("quick", model, args.branches, overrides, {"seed": args.seed, "device": "cpu", **settings})
    row = {"family": family, "model": model, "branches": args.branches, "epochs": args.epochs, "optimizer": config.optimizer, "lr_rule": config.lr_rule}
    try:
        evaluation = train(config, os.path.join(folder, family))
    except RMNError as exc:  # a run stopped by a divergence check is a result too
        return {**row, "status": type(exc).__name__, "error": str(exc)}
    with open(os.path.join(folder, family, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    return {
        **row,
        "status": "at chance" if evaluation["at_chance"] else "ok",
        "test_accuracy": evaluation["accuracy"],
        "chance_accuracy": evaluation["chance_accuracy"],
        "first_train_loss": history[0]["train_loss"],
        "last_train_loss": history[-1]["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=DEFAULT_FAMILIES, choices=list(FAMILIES))
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stem-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=["sgd", "rmsprop", "adamw"], help="Instead of the quick recipe's (SGD).")
    parser.add_argument("--lr", type=float, help="Instead of the quick recipe's rule.")
    parser.add_argument("--weight-decay", type=float, help="Instead of the quick recipe's.")
    parser.add_argument("-o", "--output", default="out/families", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_one(family, args, folder) for family in args.families]
    write_rows(args.output, rows)
    print("| family | model | N | epochs | optimizer, lr | test accuracy | chance | train loss first -> last | result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "test_accuracy" in r:
            print(
                f"| {r['family']} | {r['model']} | {r['branches']} | {r['epochs']} | {r['lr_rule']} | {r['test_accuracy']:.4f} | {r['chance_accuracy']:.4f} "
                f"| {r['first_train_loss']:.3f} -> {r['last_train_loss']:.3f} | {r['status']} |"
            )
        else:
            print(f"| {r['family']} | {r['model']} | {r['branches']} | {r['epochs']} | {r['lr_rule']} | | | | {r['status']}: {r['error']} |")
    sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()
