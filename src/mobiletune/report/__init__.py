"""Reports for people: the hyper-parameter summary, the curves, report.html and the model card."""
