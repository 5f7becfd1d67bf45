"""Text in and out: the tokenizer (typed text never becomes control tokens; a streaming detokenizer), chat
templates, tool-call parsing and the grammars that constrain decoding. Imports only the base."""
