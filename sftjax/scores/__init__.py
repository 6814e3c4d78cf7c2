"""Task metrics over the field's libraries, for `sftjax eval` and the evaluation hooks.

text: ROUGE-L (rouge-score), corpus BLEU (sacrebleu) and exact match of generated replies.
classes: accuracy, F1 and the confusion matrix of label predictions (scikit-learn), as numbers,
    a printable table and an image for TensorBoard.
entities: entity-level precision, recall and F1 of BIO tag sequences (seqeval).

Each module wraps its library and adds only the checks it lacks (empty input, mismatched lengths),
so the numbers are the ones papers report with those same libraries.
"""
