"""What torchrun starts in bench/launch: a process that joins the gloo group, does one
all-reduce and exits (the least a training script does before its first step)."""
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
tensor = torch.ones(1)
dist.all_reduce(tensor)
assert tensor.item() == dist.get_world_size()
dist.destroy_process_group()
