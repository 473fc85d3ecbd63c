"""What generated modules call at run time, and (later) training and evaluation."""
