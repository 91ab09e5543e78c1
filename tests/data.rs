//! Real data: the shipped tinyshakespeare, Fashion-MNIST from Debian, and the shipped recipes.

mod common;

use common::*;
use kiln::core::data::{fashion_mnist, sha256_file, text};
use kiln::core::recipe::Recipe;
use std::path::Path;

#[test]
fn shipped_tinyshakespeare_is_the_known_file_with_nanogpt_splits() {
    let p = repo().join("data/tinyshakespeare/input.txt");
    assert_eq!(
        sha256_file(&p).unwrap(),
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    );
    let d = text::load(&p, 64, 0.1).unwrap();
    assert_eq!(d.num_classes, 65);
    // nanoGPT's prepare.py: 1,003,854 train and 111,540 val characters.
    let tokens = |e: &dyn kiln::core::data::Examples| e.eval_order().len() * 64 + 1;
    assert!((1_003_854 - 64..=1_003_854).contains(&tokens(d.train.as_ref())));
    assert!((111_540 - 64..=111_540).contains(&tokens(d.val.as_ref())));
    let shared = repo().join("../shared/data/tinyshakespeare/input.txt");
    if require(&shared, "../shared tinyshakespeare") {
        assert_eq!(sha256_file(&shared).unwrap(), sha256_file(&p).unwrap());
    }
}

#[test]
fn fashion_mnist_from_debian() {
    if !require(
        Path::new(FASHION_MNIST),
        "Fashion-MNIST (apt-get install -y dataset-fashion-mnist)",
    ) {
        return;
    }
    let d = fashion_mnist::load(None, 5000).unwrap();
    assert_eq!(d.train.eval_order().len(), 55_000);
    assert_eq!(d.val.eval_order().len(), 5_000);
    let test = d.test.unwrap();
    assert_eq!(test.eval_order().len(), 10_000);
    // The test split is balanced: 1,000 images per class.
    let labels = test.collate(&test.eval_order()).targets;
    for c in 0..10 {
        assert_eq!(
            labels.iter().filter(|&&l| l == c).count(),
            1000,
            "class {c}"
        );
    }
    assert_eq!(d.files.len(), 4);
}

#[test]
fn every_shipped_recipe_is_valid() {
    let listing = kiln::core::recipe::list_recipes(&repo().join("recipes")).unwrap();
    assert!(listing.len() >= 3);
    for r in listing {
        let recipe =
            Recipe::load(&r.path, &[]).unwrap_or_else(|e| panic!("{}: {e}", r.path.display()));
        match &recipe.init_from {
            // The architecture comes from the pretrained folder's config.json.
            Some(from) => {
                if require(Path::new(from), "a pretrained model a recipe starts from") {
                    kiln::models::ModelConfig::from_recipe(&recipe, 2, &[])
                        .unwrap_or_else(|e| panic!("{}: {e}", r.path.display()));
                }
            }
            None => {
                kiln::models::ModelConfig::decode(&recipe)
                    .unwrap_or_else(|e| panic!("{}: {e}", r.path.display()));
            }
        }
        assert!(!recipe.description.is_empty());
    }
}
