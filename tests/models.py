"""Small models shaped like the ones people train (written here: torchvision/timm do not import on this
machine), for handler tests and benchmarks/bench_real_models.py. Sizes are arguments; defaults are tiny.

    ResNet(width, blocks)           ResNet-18-shaped CNN: conv-BN-ReLU basic blocks with shortcuts, 3xHxW input
    ViT(dim, depth, heads, patch)   patch-embedding Conv2d, cls_token and pos_embed parameters, pre-norm blocks
    Encoder(vocab, dim, depth, heads, seq)   BERT-style: token + position embeddings (padding_idx 0),
                                    attention mask from the padding, LayerNorm, a classifier on token 0
    CausalLM(vocab, dim, depth, heads, seq)  GPT-2-style: causal attention, lm_head.weight is wte.weight
    Mixed()                         Conv1d, GroupNorm, RMSNorm, LayerNorm and Linear on 3-D inputs
    hf_bert(...), hf_gpt2(...)      transformers models from small configs, wrapped to take token ids and
                                    return logits (the attention mask is derived from padding id 0)
    DropMLP(n_in, hidden, n_out, p) Linear -> ReLU -> Dropout -> Linear (masks for dropout ensembles)
    sgd_checkpoints(model, X, y, lr, steps, every)   full-batch SGD run, a cloned state dict every `every` steps
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """blocks=(2, 2, 2, 2), width=64 is ResNet-18 (CIFAR stem)."""

    def __init__(self, width: int = 4, blocks=(1, 1), classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5                  # (B, h, T, T)
        if self.causal:
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        if mask is not None:
            att = att.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = Attention(dim, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask=None):
        x = x + self.att(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 1, heads: int = 2, patch: int = 4, image: int = 8,
                 classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


class SumsScale(nn.Module):
    """A (1, 3) parameter not broadcast over the batch (summed first): per-example copies would be wrong."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, 3))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) * self.scale.sum()


class ChannelScaled(nn.Module):
    """ConvNeXt's pattern: a 1-D layer scale owned by a block with sublayers, on (B, T, C) ('gamma'), and one
    used otherwise (a diagonal matrix: 'mix'; no per-example copy reproduces it)."""

    def __init__(self, diag=False):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.gamma = nn.Parameter(torch.randn(4))
        self.mix = nn.Parameter(torch.randn(4)) if diag else None
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) * self.gamma                                       # (B, T, 4)
        if self.mix is not None:
            h = h @ torch.diag(self.mix)
        return self.head(h.mean(1))


class SharedTable(nn.Module):
    """A Linear on a position table that every example shares, added to each example's inputs."""

    def __init__(self, T: int):
        super().__init__()
        self.register_buffer("table", torch.randn(T, 4, dtype=torch.float64))
        self.pos = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):                       # x (B, T, 4)
        return self.fc((x + self.pos(self.table)).mean(1))


class Encoder(nn.Module):
    """Token ids (B, T), 0 = padding; logits (B, classes) from token 0."""

    def __init__(self, vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8,
                 classes: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(seq, dim)
        self.ln = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.classifier = nn.Linear(dim, classes)

    def forward(self, ids):
        mask = ids != 0
        x = self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)))
        for b in self.blocks:
            x = b(x, mask)
        return self.classifier(x[:, 0])


class CausalLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab); lm_head.weight is wte.weight (tied)."""

    def __init__(self, vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, causal=True) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one example: out (1, T, V), y (1, T) (-100 = ignored)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)


class Mixed(nn.Module):
    """Token ids (B, T) through Embedding (padding_idx 1), Conv1d, GroupNorm, RMSNorm, LayerNorm, Linear."""

    def __init__(self, vocab: int = 12, dim: int = 6, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=1)
        self.conv = nn.Conv1d(dim, 8, 3, padding=1, stride=1)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = nn.RMSNorm(8)
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, classes)

    def forward(self, ids):
        x = self.gn(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)   # (B, T, 8)
        x = self.ln(torch.tanh(self.fc(self.rms(x))))
        return self.out(x.mean(1))


class Recurrent(nn.Module):
    """Token ids (B, T) through Embedding (padding_idx 0), a recurrent layer (nn.LSTM / nn.GRU / nn.RNN, any
    num_layers, bidirectional, batch_first), optionally an initial state computed from the input, and a
    Linear head on the mean of the outputs."""

    def __init__(self, kind: str = "LSTM", vocab: int = 20, dim: int = 5, hidden: int = 6, layers: int = 1,
                 bidirectional: bool = False, batch_first: bool = True, init_state: bool = False,
                 packed: bool = False, classes: int = 3):
        super().__init__()
        self.kind, self.batch_first, self.init_state, self.packed = kind, batch_first, init_state, packed
        D = 2 if bidirectional else 1
        self.shape = (layers * D, hidden)
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = getattr(nn, kind)(dim, hidden, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=batch_first)
        self.init = nn.Linear(dim, layers * D * hidden) if init_state else None
        self.head = nn.Linear(D * hidden, classes)

    def forward(self, ids):
        e = self.emb(ids)
        hx = None
        if self.init is not None:
            h = torch.tanh(self.init(e.mean(1))).reshape(len(ids), *self.shape).transpose(0, 1).contiguous()
            hx = (h, torch.zeros_like(h)) if self.kind == "LSTM" else h
        if self.packed:                          # padding (id 0) at the end: lengths; the mean of valid outputs
            lengths = (ids != 0).sum(1).clamp(min=1)
            seq = pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(seq, hx)[0], batch_first=True, total_length=ids.shape[1])
            return self.head(out.sum(1) / lengths.unsqueeze(1))
        out, _ = self.rnn(e if self.batch_first else e.transpose(0, 1), hx)
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


class Stepped(nn.Module):
    """Token ids (B, T) through Embedding and a recurrent cell (nn.LSTMCell / nn.GRUCell / nn.RNNCell)
    stepped by a Python loop (a decoder's pattern), the state kept past each sequence's padding; a
    Linear head on the last state."""

    def __init__(self, kind: str = "LSTMCell", vocab: int = 20, dim: int = 5, hidden: int = 6, classes: int = 3,
                 **cell_kw):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.cell = getattr(nn, kind)(dim, hidden, **cell_kw)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        e = self.emb(ids)
        h = c = None
        for t in range(ids.shape[1]):
            on = (ids[:, t] != 0).unsqueeze(1)
            if self.kind == "LSTMCell":
                h2, c2 = self.cell(e[:, t], None if h is None else (h, c))
                h, c = (h2, c2) if h is None else (torch.where(on, h2, h), torch.where(on, c2, c))
            else:
                h2 = self.cell(e[:, t], h)
                h = h2 if h is None else torch.where(on, h2, h)
        return self.head(h)


class Attending(nn.Module):
    """Token ids (B, T) through PyTorch's own attention, a Linear head on the mean of the outputs. kind:
    "encoder"   nn.TransformerEncoder (`layers` post-norm layers, batch_first) with a boolean padding mask;
    "seq_first" nn.MultiheadAttention (batch_first=False) called directly with a float causal mask,
                asking for the attention weights (the explicit softmax path), which scale the output;
    "decoder"   nn.TransformerDecoderLayer (pre-norm, batch_first): causal self-attention, then
                cross-attention to a memory of the first 5 tokens' own embeddings with a padding mask
                (key and value the same tensor);
    "cross"     nn.MultiheadAttention with query, key and value three different tensors, a boolean
                (B heads, L, S) mask that hides one key per example;
    "encoder_seq_first"  nn.TransformerEncoder with PyTorch's default batch_first=False: every Linear,
                LayerNorm (and the embedding of ids (T, B)) runs sequence-first, (T, B, E)."""

    def __init__(self, kind: str = "encoder", vocab: int = 20, dim: int = 8, heads: int = 2, classes: int = 3,
                 layers: int = 2, ff: int | None = None):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        if kind.startswith("encoder"):
            self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, heads, ff or 2 * dim, dropout=0.1,
                                                                         batch_first=kind == "encoder"), layers,
                                              enable_nested_tensor=False)
        elif kind == "decoder":
            self.mem = nn.Embedding(vocab, dim)
            self.body = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True, norm_first=True)
        else:
            self.body = nn.MultiheadAttention(dim, heads, batch_first=False if kind == "seq_first" else True)
            self.key = nn.Linear(dim, dim) if kind == "cross" else None
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        T = ids.shape[1]
        if self.kind == "encoder_seq_first":
            h = self.body(self.emb(ids.t()), src_key_padding_mask=ids == 0)        # (T, B, E)
            return self.head(h.mean(0))
        e, pad = self.emb(ids), ids == 0
        causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=e.dtype)
        if self.kind == "encoder":
            h = self.body(e, src_key_padding_mask=pad)
        elif self.kind == "decoder":
            h = self.body(e, self.mem(ids[:, :5]), tgt_mask=causal, tgt_is_causal=True,
                          memory_key_padding_mask=pad[:, :5])
        elif self.kind == "seq_first":
            s = e.transpose(0, 1)
            h, w = self.body(s, s, s, attn_mask=causal)
            h = h.transpose(0, 1) * (1 + w.max(-1).values.unsqueeze(-1))
        else:
            hide = torch.zeros(len(ids) * self.heads, T, T - 1, dtype=torch.bool)
            hide[:, :, 0] = True
            h, _ = self.body(e, self.key(e[:, 1:]), e[:, 1:] * 0.5, attn_mask=hide, need_weights=False)
        return self.head(h.mean(1))


class HFWrapper(nn.Module):
    """A transformers model as tensor -> logits (attention mask: ids != 0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, attention_mask=(ids != 0).long()).logits


def hf_bert(vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8, classes: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                     intermediate_size=4 * dim, max_position_embeddings=seq, num_labels=classes,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                     attn_implementation="eager")
    return HFWrapper(BertForSequenceClassification(cfg))


def hf_gpt2(vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=dim, n_layer=depth, n_head=heads, n_positions=seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                     tie_word_embeddings=True, attn_implementation="eager")
    return HFWrapper(GPT2LMHeadModel(cfg))


def hf_llama(vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8):
    """transformers LlamaForCausalLM: RMSNorm (its own class), grouped-query attention (heads // 2 key-value
    heads), SwiGLU MLP of 8/3 dim, rotary positions, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=(8 * dim // 3 + 7) // 8 * 8,
                      num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=seq, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                      tie_word_embeddings=False, attn_implementation="eager")
    return HFWrapper(LlamaForCausalLM(cfg))


def hf_opt(vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8):
    """transformers OPTForCausalLM: positions counted from the attention mask, its MLP on the batch folded
    into positions (reshape(-1, D)), tied head."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=vocab, hidden_size=dim, ffn_dim=4 * dim, num_hidden_layers=depth,
                    num_attention_heads=heads, max_position_embeddings=seq, word_embed_proj_dim=dim, dropout=0.0,
                    attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    return HFWrapper(OPTForCausalLM(cfg))


def hf_moe(kind: str = "mixtral", vocab: int = 30, dim: int = 16, depth: int = 1, heads: int = 2, seq: int = 8,
           experts: int = 4, implementation: str = "eager"):
    """transformers MixtralForCausalLM / Qwen2MoeForCausalLM (a shared expert with its sigmoid gate) with `experts`
    experts, 2 per token: fused expert weights gate_up_proj (E, 2I, D) and down_proj (E, D, I), routed by a
    TopKRouter; experts_implementation "eager" (per-expert F.linear: any dtype) or "grouped_mm" (transformers'
    default on CPU, float32 / half only)."""
    import transformers as tr

    common = dict(vocab_size=vocab, hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 2), max_position_embeddings=seq, num_experts_per_tok=2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    if kind == "mixtral":
        cfg = tr.MixtralConfig(intermediate_size=2 * dim, num_local_experts=experts, **common)
        model = tr.MixtralForCausalLM
    else:
        cfg = tr.Qwen2MoeConfig(intermediate_size=2 * dim, moe_intermediate_size=dim, shared_expert_intermediate_size=dim,
                                num_experts=experts, **common)
        model = tr.Qwen2MoeForCausalLM
    cfg._experts_implementation = implementation
    return HFWrapper(model(cfg))


def token_batch(n: int, seq: int, vocab: int, pad: int = 0, seed: int = 0) -> torch.Tensor:
    """(n, seq) ids in 2..vocab-1 with repeated tokens and trailing padding (`pad`) of random length."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, min(vocab, 6), (n, seq), generator=gen)     # few distinct tokens: repeats
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
    ids[torch.arange(seq).unsqueeze(0) >= lengths.unsqueeze(1)] = pad
    return ids


class DropMLP(nn.Module):
    """n_in -> hidden -> ReLU -> dropout(p) -> n_out: small, with dropout so ensembles have masks to vary."""

    def __init__(self, n_in: int = 6, hidden: int = 8, n_out: int = 3, p: float = 0.5):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(n_in, hidden), nn.Dropout(p), nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def sgd_checkpoints(model: nn.Module, X: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
                    every: int) -> list[dict]:
    """Train `model` with full-batch SGD on cross-entropy for `steps` steps; return a cloned state dict
    after every `every`-th step (distinct tensors: a state_dict() alone would alias the live weights)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    states = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        if step % every == 0:
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def topic_lm(vocab: int, seq: int, n: int, topics: int, steps: int, saves: int = 1, lr: float = 3e-3):
    """A tied-embedding CausalLM (dim 16, one block) fitted with full-batch Adam on `n` sequences whose
    tokens come from one of `topics` blocks of 100 words: (model, ids (n, seq), next-token targets
    (n, seq) with -100 at the end, [state dict after every steps // saves steps])."""
    torch.manual_seed(0)
    model = CausalLM(vocab=vocab, dim=16, depth=1, seq=seq)
    topic = torch.randint(0, topics, (n,))
    ids = topic[:, None] * 100 + torch.randint(0, 100, (n, seq))
    y = torch.cat([ids[:, 1:], torch.full((n, 1), -100)], 1)
    opt = torch.optim.Adam(model.parameters(), lr)
    states = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(model(ids).reshape(-1, vocab), y.reshape(-1), ignore_index=-100).backward()
        opt.step()
        if step % (steps // saves) == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, ids, y, states


# Layer-handler cases: () -> (float64 model, inputs, targets, loss_fn), small enough for the per-example loop.
# tests/test_handlers.py checks each on the CPU, tests/test_gpu.py on CUDA.

def _case_resnet():
    torch.manual_seed(0)
    m = ResNet(width=3, blocks=(1, 1)).double()
    m.train()
    with torch.no_grad():
        for _ in range(2):                              # non-trivial running statistics
            m(torch.randn(8, 3, 6, 6, dtype=torch.float64))
    return m, torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (4,)), F.cross_entropy


def _case_vit():
    torch.manual_seed(0)
    return ViT().double(), torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (3,)), F.cross_entropy


def _case_encoder(hf=False):
    torch.manual_seed(0)
    m = (hf_bert() if hf else Encoder()).double()
    return m, token_batch(4, 8, 30), torch.randint(0, 3, (4,)), F.cross_entropy


def _case_lm(hf=False):
    torch.manual_seed(0)
    m = (hf_gpt2() if hf else CausalLM()).double()
    ids = token_batch(3, 8, 30, pad=0)
    y = torch.cat([ids[:, 1:], torch.zeros(3, 1, dtype=torch.long)], 1)
    y[y == 0] = -100                                     # padding is not predicted
    return m, ids, y, lm_loss


def _case_mixed():
    torch.manual_seed(0)
    return Mixed().double(), token_batch(4, 7, 12, pad=1), torch.randint(0, 3, (4,)), F.cross_entropy


def _case_rnn(kind, **kw):
    def build():
        torch.manual_seed(0)
        return Recurrent(kind, **kw).double(), token_batch(4, 7, 20), torch.randint(0, 3, (4,)), F.cross_entropy
    return build


class ScaledEmbedding(nn.Embedding):
    """Gemma's pattern: the looked-up rows times a constant (sqrt(D))."""

    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim ** 0.5


class MaskPositions(nn.Embedding):
    """OPT's pattern: positions counted from the attention mask (keyword), offset by 2, then looked up."""

    def forward(self, mask, offset=0):
        pos = (torch.cumsum(mask, 1) * mask).long() - 1
        return super().forward(pos + 2 + offset)


class OwnRMSNorm(nn.Module):
    """Gemma's pattern of a norm no handler is registered for: x / rms(x) * (1 + w)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class ChannelLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm subclass with its own forward, over the channels of (B, C, H, W)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """timm's LayerScale: x * gamma (a parameter not named weight)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(1e-1 * torch.randn(dim) + 1)

    def forward(self, x):
        return x * self.gamma


class LibraryPatterns(nn.Module):
    """Token ids (B, T) through what other libraries' models do: a scaled embedding plus positions counted
    from the mask (keyword call), norms known only by their structure (an own RMSNorm, a channels-first
    LayerNorm subclass on a (B, C, T, 1) view), timm's LayerScale, a Linear on the batch folded into its positions
    (OPT's reshape(-1, D)) and one on windows of positions folded into the batch (Swin's (B k, S, D))."""

    def __init__(self, vocab=20, dim=6, classes=3, window=2):
        super().__init__()
        self.window = window
        self.emb = ScaledEmbedding(vocab, dim, padding_idx=0)
        self.pos = MaskPositions(12, dim)
        self.norm = OwnRMSNorm(dim)
        self.cnorm = ChannelLayerNorm2d(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.win = nn.Linear(2 * dim, dim)
        self.scale = LayerScale(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        mask = (ids != 0).long()
        h = self.norm(self.emb(ids) + self.pos(mask, offset=0))                      # (B, T, D)
        h = self.cnorm(h.transpose(1, 2).unsqueeze(3)).squeeze(3).transpose(1, 2)     # channels first
        B, T, D = h.shape
        f = torch.tanh(self.fc(h.reshape(-1, D))).reshape(B, T, -1)                  # folded (B T, 2D)
        w = f.reshape(B * T // self.window, self.window, -1)                          # windows (B k, S, 2D)
        h = self.scale(torch.tanh(self.win(w)).reshape(B, T, D))
        return self.head((h * mask.unsqueeze(2)).sum(1))


def _case_library(window=2):
    """window 4 with 4 examples of 8 tokens: windows (8, 4, 2D), sequence-first or folded by their shapes."""
    def build():
        torch.manual_seed(0)
        return (LibraryPatterns(window=window).double(), token_batch(4, 8, 20), torch.randint(0, 3, (4,)),
                F.cross_entropy)
    return build


def _case_hf(kind):
    """Hugging Face models from small configs, float64: Llama (RMSNorm by structure, grouped-query
    attention), OPT (positions from the mask, its MLP on the batch folded into positions), Swin (windows
    folded into the batch; 4 windows of 4 patches with 4 examples: (16, 4, C), told by a smaller pass), Mixtral
    and Qwen2-MoE (fused expert weights and their routers on the batch's tokens folded into rows)."""
    def build():
        import transformers as tr
        torch.manual_seed(0)
        if kind == "swin":
            cfg = tr.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1], num_heads=[2],
                                window_size=2, num_labels=3, attn_implementation="eager")
            return (HFImages(tr.SwinForImageClassification(cfg)).double(), torch.randn(4, 3, 8, 8, dtype=torch.float64),
                    torch.randint(0, 3, (4,)), F.cross_entropy)
        m = hf_moe(kind, seq=16) if kind in ("mixtral", "qwen2_moe") else (hf_llama if kind == "llama" else hf_opt)(seq=16)
        ids = token_batch(3, 8, 30, pad=0)
        y = torch.cat([ids[:, 1:], torch.zeros(3, 1, dtype=torch.long)], 1)
        y[y == 0] = -100
        return m.double(), ids, y, lm_loss
    return build


class HFImages(nn.Module):
    """A transformers image classifier called as model(pixel_values) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


class Grouped(nn.Module):
    """Images (B, 4, 8, 8) through grouped convolutions: depthwise 3x3 (groups = channels, bias), 3x3 in 2
    groups (stride 2, dilation 2, no bias), pointwise; then (B, 6, 16) through a Conv1d in 3 groups."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.gc = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.pw = nn.Conv2d(8, 6, 1)
        self.c1 = nn.Conv1d(6, 6, 3, padding=1, groups=3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.pw(torch.tanh(self.gc(torch.tanh(self.dw(x))))))          # (B, 6, 4, 4)
        return self.head(torch.tanh(self.c1(h.flatten(2))).mean(2))


def _case_grouped():
    torch.manual_seed(0)
    return Grouped().double(), torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,)), F.cross_entropy


def _case_attention(kind):
    def build():
        torch.manual_seed(0)
        return Attending(kind).double(), token_batch(4, 7, 20), torch.randint(0, 3, (4,)), F.cross_entropy
    return build


def _case_cell(kind, **kw):
    def build():
        torch.manual_seed(0)
        return Stepped(kind, **kw).double(), token_batch(4, 7, 20), torch.randint(0, 3, (4,)), F.cross_entropy
    return build


HANDLER_CASES = {"resnet_bn": _case_resnet, "vit": _case_vit, "encoder_mask": _case_encoder,
                 "causal_lm_tied": _case_lm, "mixed": _case_mixed,
                 "lstm": _case_rnn("LSTM"),
                 "lstm_2layer_bidir_state": _case_rnn("LSTM", layers=2, bidirectional=True, batch_first=False,
                                                      init_state=True),
                 "gru_2layer_bidir_state": _case_rnn("GRU", layers=2, bidirectional=True, init_state=True),
                 "rnn_tanh_seq_first": _case_rnn("RNN", layers=2, batch_first=False),
                 "lstm_packed_bidir_state": _case_rnn("LSTM", layers=2, bidirectional=True, init_state=True,
                                                      packed=True),
                 "lstm_cell_loop": _case_cell("LSTMCell"), "gru_cell_loop": _case_cell("GRUCell"),
                 "rnn_cell_relu_nobias": _case_cell("RNNCell", nonlinearity="relu", bias=False),
                 "torch_encoder_padmask": _case_attention("encoder"),
                 "torch_encoder_seq_first": _case_attention("encoder_seq_first"),
                 "mha_seq_first_weights": _case_attention("seq_first"),
                 "torch_decoder_cross": _case_attention("decoder"), "mha_cross_qkv": _case_attention("cross"),
                 "grouped_conv": _case_grouped, "library_patterns": _case_library(), "library_patterns_ambiguous": _case_library(window=4),
                 "hf_bert": lambda: _case_encoder(True), "hf_gpt2_tied": lambda: _case_lm(True),
                 "hf_llama": _case_hf("llama"), "hf_opt": _case_hf("opt"), "hf_swin": _case_hf("swin"),
                 "hf_mixtral": _case_hf("mixtral"), "hf_qwen2_moe": _case_hf("qwen2_moe")}
