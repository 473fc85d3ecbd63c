"""Distributed training on torch.distributed (gloo on CPU): the strategies of the one training loop for FSDP2
data parallel, DiLoCo / Streaming DiLoCo and fault-tolerant replica groups on torchft (strategies.py), with
their pieces: DCP checkpoints (dcp.py), the outer loop (diloco.py), 4-bit outer gradients (fp4.py), torchft
glue (ft.py), and process start-up (launch.py)."""
