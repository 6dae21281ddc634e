"""SMI pretraining of ResNet-18 (CIFAR stem) on 32 px CIFAR-10 shards — the small recipe used for our results.

Defaults: ResNet-18 with a 3x3 stride-1 stem and no max-pool, projector 2048-2048-2048, CIFAR augmentations (crop
scale 0.2-1, no blur), batch 256, LARS (lr 0.3 per 256 images for weights and biases, weight decay 1e-4), 10
warmup epochs then cosine, 200 epochs, online kNN monitor on the test split every 5 epochs' worth of steps (set
--eval-every). Without --data it trains on the small CIFAR-10 sample bundled with the package.

    accelerate launch recipes/pretrain_cifar10.py \\
        --data 'cifar10/train-{000000..000004}.tar.gz' --epoch-samples 50000 \\
        --eval-train 'cifar10/train-{000000..000004}.tar.gz' --eval-test cifar10/test-000000.tar.gz \\
        --eval-every 1000 --output-dir runs/cifar10_smi

(``--epoch-samples`` is needed only when the shards have no JSON index, i.e. were not written by smi-make-shards.)

Use ``--loss barlow`` or ``--loss vicreg`` for the baselines, ``--model`` for any other timm backbone.
"""
from smi_timm.cli.pretrain import run_recipe

DEFAULTS = dict(
    model="resnet18",
    cifar_stem=True,
    projector="2048-2048-2048",
    image_size=32,
    augment="cifar",
    data=["sample"],
    eval_train=["sample:train"],
    eval_test=["sample:test"],
    batch_size=256,
    loss="smi",
    optimizer="lars",
    lr=0.3,
    lr_biases=None,
    weight_decay=1e-4,
    epochs=200,
    warmup_epochs=10,
    output_dir="runs/cifar10",
    save_every=1000,
)

if __name__ == "__main__":
    raise SystemExit(run_recipe(DEFAULTS, description=__doc__, prog="pretrain_cifar10.py"))
