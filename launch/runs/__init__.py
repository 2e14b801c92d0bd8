"""Run folders and what is read from them: their layout and JSON-lines logs (``runlog``), one
row of figures per run (``summary``), ``threelc report``'s table and plots (``report``) and the
training loop's progress bar (``progress``).  The bottom layer of :mod:`threelc.launch`: needs no
torch and imports none of the other subpackages.
"""
