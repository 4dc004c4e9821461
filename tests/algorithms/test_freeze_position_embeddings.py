"""m3composer/algorithms/freeze_position_embeddings.py: position embeddings get no update."""
import torch
from composer import Trainer
from composer.core import DataSpec
from composer.models import ComposerModel
from transformers import XLMRobertaConfig, XLMRobertaModel

from m3composer.algorithms import FreezePositionEmbeddings, freeze_position_embeddings


class TinyEncoderModel(ComposerModel):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = XLMRobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, type_vocab_size=1)
        self.encoder = XLMRobertaModel(cfg, add_pooling_layer=False)

    def forward(self, batch):
        return self.encoder(input_ids=batch).last_hidden_state

    def loss(self, outputs, batch):
        return outputs.pow(2).mean()


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 50, (4, 12), generator=g) for _ in range(n)]


def test_function_freezes_only_position_embeddings():
    model = TinyEncoderModel()
    frozen = freeze_position_embeddings(model)
    assert frozen == ["encoder.embeddings.position_embeddings.weight"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.embeddings.word_embeddings.weight" in trainable
    assert "encoder.embeddings.position_embeddings.weight" not in trainable


def test_algorithm_keeps_position_embeddings_bit_identical_through_training():
    model = TinyEncoderModel()
    pos_before = model.encoder.embeddings.position_embeddings.weight.detach().clone()
    word_before = model.encoder.embeddings.word_embeddings.weight.detach().clone()
    # The optimizer lists every parameter (built before INIT) and decays weights: the frozen
    # tensor must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    trainer = Trainer(model=model, train_dataloader=DataSpec(_batches(6), get_num_samples_in_batch=lambda b: b.shape[0]),
                      max_duration="6ba", optimizers=optimizer, algorithms=[FreezePositionEmbeddings()],
                      device="cpu", device_train_microbatch_size=4, progress_bar=False, log_to_console=False)
    trainer.fit()
    assert torch.equal(model.encoder.embeddings.position_embeddings.weight, pos_before)
    assert not torch.equal(model.encoder.embeddings.word_embeddings.weight, word_before)
