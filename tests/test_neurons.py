"""Classifier-head discovery shared by TSBD's and the pruning family's layer selection: never the head by default."""

from __future__ import annotations

import timm
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from lightning_ft._internal.neurons import classifier_heads


def test_hugging_face_classification_heads():
    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_labels=3,
        )
    )
    bert = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    )
    assert classifier_heads(vit) == ["classifier"]
    assert classifier_heads(bert) == ["classifier"]


def test_a_backbone_without_head_under_the_users_own_head():
    model = nn.Sequential(timm.create_model("test_resnet", pretrained=False, num_classes=0), nn.Linear(96, 10))
    assert classifier_heads(model) == ["1"]  # timm's get_classifier() is an Identity: the last layer is the head
    assert classifier_heads(timm.create_model("test_resnet", pretrained=False, num_classes=10)) == ["fc"]
