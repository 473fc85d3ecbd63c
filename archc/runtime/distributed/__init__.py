"""Distributed training on torch.distributed (gloo on CPU): FSDP2 data parallel, DiLoCo / Streaming DiLoCo,
4-bit outer gradients. See trainer.py, diloco.py, fp4.py, launch.py."""
