"""SMI pretraining of ViT-S/16 (timm ``vit_small_patch16_224``) on ImageNet WebDataset shards.

The timm backbone swap of ``pretrain_r50.py``: AdamW (lr 5e-4 per 256 images, weight decay 0.05, no decay on
biases, norms, position embedding and class token), 10 warmup epochs then cosine, 300 epochs, stochastic depth 0.1,
projector 8192-8192-8192, BYOL augmentations, bf16 recommended. Global batch 1024 = 128 per GPU × 8 GPUs.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 recipes/pretrain_vit_s16.py \\
        --data 'imagenet/train-{000000..001023}.tar' --output-dir runs/vit_s16

Any other ViT: ``--model vit_base_patch16_224`` (or ``--model-kwargs img_size=160``). Interrupt with Ctrl-C or
SIGTERM: a checkpoint is saved first; continue with ``--resume auto``.
"""
from smi_timm.cli.pretrain import run_recipe

DEFAULTS = dict(
    model="vit_small_patch16_224",
    model_kwargs={"drop_path_rate": 0.1},
    projector="8192-8192-8192",
    image_size=224,
    augment="byol",
    batch_size=128,
    loss="smi",
    sync_bn=True,
    optimizer="adamw",
    lr=5e-4,
    lr_biases=None,
    weight_decay=0.05,
    epochs=300,
    warmup_epochs=10,
    min_lr_ratio=0.01,
    clip_grad=3.0,
    output_dir="runs/vit_s16",
    save_every=2500,
)

if __name__ == "__main__":
    raise SystemExit(run_recipe(DEFAULTS, description=__doc__, prog="pretrain_vit_s16.py"))
