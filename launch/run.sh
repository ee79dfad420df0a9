#!/usr/bin/env bash
# Runs a dist-attn entry point under torchrun, one process per GPU (or per CPU rank with gloo).
#
#   one node:     NGPU=8 launch/run.sh launch.demo --seqlen 131072 --dtype bfloat16
#   many nodes:   on every node, with its own NODE_RANK:
#                 NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 launch/run.sh launch.train --sp 8
#   CPU only:     NGPU=4 launch/run.sh launch.demo        (4 gloo ranks)
#
# Environment (defaults in brackets): NGPU processes per node [GPUs on this node, else 4], NNODES [1],
# NODE_RANK [0], MASTER_ADDR [localhost], MASTER_PORT [29500], LOG_RANK ranks whose output is shown,
# comma-separated local ranks [0], PYTHON [python].
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: launch/run.sh MODULE [ARGS...]   (MODULE: launch.demo, launch.train, launch.train_deepspeed or launch.train_pipeline)" >&2
    exit 2
fi
MODULE=$1
shift
PYTHON=${PYTHON:-python}
NGPU=${NGPU:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 4)')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_RANK=${LOG_RANK:-0}

cd "$(dirname "$0")/.."
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NGPU" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m "$MODULE" "$@"
