"""The generated contextual QA and summarisation set shipped for the default hallucination run.

`qa.jsonl` (questions answered in the document), `tempting.jsonl` (documents that contradict
common knowledge, so an answer from memory is a hallucination) and `summary.jsonl` (news-style
reports with a reference summary) are written by `generate.py`, deterministically.
"""
