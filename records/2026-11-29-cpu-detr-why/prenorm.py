"""detr.py with the official pre-norm transformer (facebookresearch/detr --pre_norm): a patch for an experiment."""
import sys, torch.nn as nn
sys.path.insert(0, ".")
import detr

def enc_forward(self, src, pos, key_padding_mask):
    src2 = self.norm1(src)
    q = k = src2 + pos
    src = src + self.dropout(self.self_attn(q, k, src2, key_padding_mask=key_padding_mask, need_weights=False)[0])
    src2 = self.norm2(src)
    return src + self.dropout(self.linear2(self.dropout(detr.F.relu(self.linear1(src2)))))

def dec_forward(self, tgt, memory, pos, query_pos, key_padding_mask):
    tgt2 = self.norm1(tgt)
    q = k = tgt2 + query_pos
    tgt = tgt + self.dropout(self.self_attn(q, k, tgt2, need_weights=False)[0])
    tgt2 = self.norm2(tgt)
    tgt = tgt + self.dropout(self.multihead_attn(tgt2 + query_pos, memory + pos, memory,
                                                 key_padding_mask=key_padding_mask, need_weights=False)[0])
    tgt2 = self.norm3(tgt)
    return tgt + self.dropout(self.linear2(self.dropout(detr.F.relu(self.linear1(tgt2)))))

detr.EncoderLayer.forward, detr.DecoderLayer.forward = enc_forward, dec_forward
_init = detr.Transformer.__init__
def init(self, cfg):
    _init(self, cfg)
    self.encoder.norm = nn.LayerNorm(cfg.hidden_dim)
    last = self.encoder.layers[-1]
    _f = last.forward
    last.forward = lambda *a, **k: self.encoder.norm(_f(*a, **k))  # the encoder's final norm
detr.Transformer.__init__ = init
if __name__ == "__main__":
    detr.main(sys.argv[1:])
