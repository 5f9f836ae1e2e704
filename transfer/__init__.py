"""Transfer evaluations of a frozen or fine-tuned encoder (the paper's Tables 1-3)."""
