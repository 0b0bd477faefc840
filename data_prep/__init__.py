"""Data preparation: sentencepiece tokenizers and megatron-core indexed datasets from real text.

Commands (each prints `error: <message>` and exits 2 on bad input, leaving no partial output):

    python -m data_prep.default_corpus --out data/default       # stdlib sources, one command
    python -m data_prep.tokenizer --input corpus/ --out data/tok/tokenizer --vocab-size 8192
    python -m data_prep.tokenize --input corpus/ --tokenizer data/tok/tokenizer.model \
        --out data/corpus_text_document --workers 2
"""
