//! PNG figures for 2-D work.
