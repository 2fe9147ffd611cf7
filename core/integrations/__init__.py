"""Adapters that let programs Switchyard did not write call its ops: transformers models, speculative
decoding with a draft and a target model, and DistributedDataParallel communication hooks.

Each adapter translates the client's calling convention into one dispatcher call and back; tuning,
caching and validation stay in the dispatcher. The modules import their client library lazily, so
``import core.integrations`` costs nothing without transformers installed.
"""
