"""Distributed training on torch.distributed (gloo on CPU): FSDP2 data parallel, DiLoCo / Streaming DiLoCo,
4-bit outer gradients, fault-tolerant replica groups on torchft. See trainer.py, diloco.py, fp4.py, ft.py,
launch.py."""
