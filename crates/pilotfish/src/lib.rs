//! What the `pilotfish` command and its tests share: the article's scene (`scene`), which
//! `pilotfish demo` runs and the scene tests check.

pub mod scene;
