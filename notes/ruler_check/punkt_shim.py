"""Stand-in for nltk.tokenize.sent_tokenize: NLTK's Punkt algorithm with default (untrained) parameters.
The trained English punkt model (nltk_data tokenizers/punkt) cannot be downloaded here."""
from nltk.tokenize.punkt import PunktSentenceTokenizer

_TOKENIZER = PunktSentenceTokenizer()


def sent_tokenize(text, language="english"):
    return _TOKENIZER.tokenize(text)
