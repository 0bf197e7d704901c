"""What a switch is and what is computed from switches: the record types and columns
(``schema``), statistics and histograms (``stats``), exit-reason names, units and the
PF/VF filter.  Plain data and arithmetic: it imports nothing else of vftrace, so the
recorder, the capture files, the reports and the dashboard can all share it."""
