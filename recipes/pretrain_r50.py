"""SMI pretraining of ResNet-50 on ImageNet WebDataset shards (224 px).

Defaults follow the published Barlow Twins ImageNet recipe with the SMI loss: global batch 2048 (256 per GPU on 8
GPUs), LARS (lr 0.2 for weights and 0.0048 for biases/norms per 256 images, weight decay 1.5e-6, momentum 0.9),
10 warmup epochs then cosine, 1000 epochs, projector 8192-8192-8192, BYOL augmentations. Every default is a flag
(``--help``); ``--model`` swaps in any timm backbone.

On a CUDA device the run defaults to what a GPU wants: bf16 autocast (``--mixed-precision auto``), channels-last
memory, TF32 convolutions, cuDNN autotuning, images decoded and augmented on the GPU (``--augment-device auto``; the
loader workers only read shards) with the next batch prepared on a side stream, and the loss kernels compiled once
per machine before the processes start. The loop reads nothing back from the GPU between log steps.

Single GPU (keep the global batch with gradient accumulation)::

    accelerate launch --num_processes 1 --mixed_precision bf16 recipes/pretrain_r50.py \\
        --data 'imagenet/train-{000000..001023}.tar' --batch-size 256 --grad-accum 8 --output-dir runs/r50

8 GPUs on one node::

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 recipes/pretrain_r50.py \\
        --data 'imagenet/train-{000000..001023}.tar' --output-dir runs/r50

Several nodes (run on every node; here 4 nodes × 8 GPUs, batch 64 per GPU keeps the global batch at 2048)::

    accelerate launch --multi_gpu --num_machines 4 --num_processes 32 --machine_rank $NODE_RANK \\
        --main_process_ip $MASTER_ADDR --main_process_port 29500 --mixed_precision bf16 \\
        recipes/pretrain_r50.py --data 'imagenet/train-{000000..001023}.tar' --batch-size 64 --output-dir runs/r50

The matching accelerate config (``accelerate config`` writes it; the flags above are equivalent). For full precision
write ``mixed_precision: 'no'`` with the quotes: a bare ``no`` is read by YAML as the boolean false, which accelerate
rejects::

    compute_environment: LOCAL_MACHINE
    distributed_type: MULTI_GPU
    mixed_precision: bf16
    num_machines: 1
    num_processes: 8
    dynamo_config: {}

Interrupt with Ctrl-C or SIGTERM: a checkpoint is saved first; continue with ``--resume auto``.
"""
from smi_timm.cli.pretrain import run_recipe

DEFAULTS = dict(
    model="resnet50",
    projector="8192-8192-8192",
    image_size=224,
    augment="byol",
    batch_size=256,
    loss="smi",
    sync_bn=True,
    optimizer="lars",
    lr=0.2,
    lr_biases=0.0048,
    weight_decay=1.5e-6,
    epochs=1000,
    warmup_epochs=10,
    output_dir="runs/r50",
    save_every=2500,
)

if __name__ == "__main__":
    raise SystemExit(run_recipe(DEFAULTS, description=__doc__, prog="pretrain_r50.py"))
