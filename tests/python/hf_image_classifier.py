"""Loads a kiln export with transformers' Auto classes and classifies image files.

usage: hf_image_classifier.py FOLDER IMAGE... ; prints one JSON object: the model class, the
processor's pixel values and the model's logits per image, and the predicted label names.
The images go through the folder's own preprocessor_config.json (AutoImageProcessor), as a
serving stack would run them.
"""

import json
import sys

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

folder, files = sys.argv[1], sys.argv[2:]
processor = AutoImageProcessor.from_pretrained(folder)
model = AutoModelForImageClassification.from_pretrained(folder).eval()
images = [Image.open(f) for f in files]
pixels = processor(images=images, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = model(pixel_values=pixels).logits
print(
    json.dumps(
        {
            "architecture": type(model).__name__,
            "pixel_values": pixels.flatten().tolist(),
            "logits": logits.tolist(),
            "labels": [model.config.id2label[int(i)] for i in logits.argmax(-1)],
        }
    )
)
