"""The PyTorch peers' memory bank: per stream, ring buffers of chunk keys and of the chunks' token
keys/values, as the C++ HostMemoryBank (slot q % C for the q-th chunk, FIFO over chunks).
Shared by train_torch.py and longmem_torch.py."""
import torch


class MemoryBank:
    """Row b of the preallocated tensors is stream b's bank; all streams append T tokens per segment, so
    they share the ring position and fill count. FIFO over chunks of csz tokens (slot q % C for the q-th
    chunk, as the C++ HostMemoryBank)."""

    def __init__(self, B, H, dh, msz, csz, device="cpu", dtype=torch.float32):
        assert msz % csz == 0
        self.C, self.csz = msz // csz, csz
        self.chunk_keys = torch.zeros(B, H, self.C, dh, device=device, dtype=dtype)
        self.keys = torch.zeros(B, H, self.C, csz * dh, device=device, dtype=dtype)
        self.values = torch.zeros(B, H, self.C, csz * dh, device=device, dtype=dtype)
        self.pos, self.count = 0, 0

    @torch.no_grad()  # banks hold detached keys/values (the training peer calls this under autograd)
    def append(self, k, v):
        """k, v (B, H, T, dh) from the backbone's memory layer; T a multiple of csz."""
        B, H, T, dh = k.shape
        assert T % self.csz == 0, "segment length must be a multiple of the chunk size"
        n = T // self.csz
        k = k.reshape(B, H, n, self.csz, dh)
        v = v.reshape(B, H, n, self.csz, dh)
        if n > self.C:
            k, v, n = k[:, :, -self.C:], v[:, :, -self.C:], self.C
        slots = (torch.arange(n, device=k.device) + self.pos) % self.C
        self.chunk_keys.index_copy_(2, slots, k.mean(3))
        self.keys.index_copy_(2, slots, k.reshape(B, H, n, -1))
        self.values.index_copy_(2, slots, v.reshape(B, H, n, -1))
        self.pos = (self.pos + n) % self.C
        self.count = min(self.count + n, self.C)

    def tensors(self):
        """The filled part (slots [0, count) until the ring is full, then all of it)."""
        c = self.count
        if c == self.C:
            return self.chunk_keys, self.keys, self.values
        return self.chunk_keys[:, :, :c], self.keys[:, :, :c], self.values[:, :, :c]
