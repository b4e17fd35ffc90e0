"""Phi-3 (and Phi-3.5 / Phi-4-mini): the LLaMA block with fused projections.

  self_attn.qkv_proj.weight [(H + 2 G) * hd, d]: rows [q heads 0..H-1; k heads 0..G-1;
                                                  v heads 0..G-1], hd rows per head
  mlp.gate_up_proj.weight   [2 m, d]:            rows [gate 0..m-1; up 0..m-1]
  o_proj [d, H * hd] and down_proj [d, m] are separate, as in LLaMA.
No projection has a bias in the stock code (no config flag either), so compensation biases on
o_proj / down_proj are recorded in `cfsp_extra_bias`.

LoRA targets named q_proj / k_proj / v_proj (gate_proj / up_proj) mean the fused module
(`fused_names`): one adapter update spans all its roles.

Only `parts` differs from the base adapter: it says which rows of the fused modules each role
is. The row ranges come from the modules' own shapes (H * hd = o_proj's input width, m =
down_proj's), never from the config, so they hold for a block pruned to its own widths, and
the base `slice_block` / `resize_block` then cut and rebuild the fused modules role by role.
The stock forward splits qkv at config.num_attention_heads * hd (a config value): a block with
other head counts gets a per-block config view (`modeling_cfsp.BlockConfig`), set by the base
`set_attention_heads`.
"""

from torch import nn

from cfsp.arch.base import BlockParts, DecoderAdapter, RoleRows


class Phi3Adapter(DecoderAdapter):
    name = "phi3"
    model_types = ("phi3",)
    fused_names = {
        "q_proj": "qkv_proj",
        "k_proj": "qkv_proj",
        "v_proj": "qkv_proj",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
    }

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = attn.qkv_proj, mlp.gate_up_proj
        q = attn.o_proj.in_features  # H * hd rows of q
        kv = (qkv.out_features - q) // 2  # G * hd rows each of k and v
        m = mlp.down_proj.in_features
        return BlockParts(
            attn=attn,
            q=RoleRows(qkv, 0, q),
            k=RoleRows(qkv, q, q + kv),
            v=RoleRows(qkv, q + kv, q + 2 * kv),
            o=attn.o_proj,
            mlp=mlp,
            gate=RoleRows(gate_up, 0, m),
            up=RoleRows(gate_up, m, 2 * m),
            down=mlp.down_proj,
        )
