import pytest
import torch
from PIL import Image

from ftdeploy.config import ModelConfig
from ftdeploy.errors import ModelError
from ftdeploy.models import LITE0_PACKAGE, build_model


@pytest.mark.parametrize("name,head", [("torchvision:resnet18", "fc"), ("torchvision:mobilenet_v3_small", "classifier.3"),
                                       ("torchvision:efficientnet_b0", "classifier.1"),
                                       ("torchvision:squeezenet1_1", "classifier.1"), ("timm:resnet10t", "fc")])
def test_head_is_replaced_for_the_class_count(name, head):
    built = build_model(ModelConfig(name=name, weights="none"), num_classes=7)
    assert built.head_name == head
    assert built.model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_model_names_suggest_the_right_one():
    with pytest.raises(ModelError, match="unknown torchvision classification model 'resnet181'.*did you mean 'resnet18'"):
        build_model(ModelConfig(name="torchvision:resnet181"), 2)
    with pytest.raises(ModelError, match="unknown model family .tv.*known: det, hf, timm, tiny, torchvision"):
        build_model(ModelConfig(name="tv:resnet18"), 2)
    with pytest.raises(ModelError, match="lacks a family prefix"):
        build_model(ModelConfig(name="resnet18"), 2)
    with pytest.raises(ModelError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        build_model(ModelConfig(name="torchvision:resnet18", weights="IMAGENET9K"), 2)


def test_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """torchvision's own loading path, fed from a pre-seeded torch hub cache instead of the network."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    reference = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    built = build_model(ModelConfig(name="torchvision:resnet18", weights="IMAGENET1K_V1"), num_classes=5)
    loaded = built.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items() if not k.startswith("fc."))
    assert built.model.fc.out_features == 5
    assert built.defaults["resize_size"] == 256 and built.defaults["input_size"] == 224


def test_torchvision_weights_offline_without_the_file_say_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"put it at .*hub/checkpoints/resnet18-f37072fd\.pth"):
        build_model(ModelConfig(name="torchvision:resnet18", weights="DEFAULT"), 2)


def test_local_checkpoint_loads_the_backbone_and_rejects_other_architectures(tmp_path):
    from safetensors.torch import save_file

    source = build_model(ModelConfig(name="torchvision:resnet18", weights="none"), 3).model
    save_file(source.state_dict(), tmp_path / "ckpt.safetensors")
    built = build_model(ModelConfig(name="torchvision:resnet18", weights=str(tmp_path / "ckpt.safetensors")), 3)
    assert all(torch.equal(built.model.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ModelError, match="does not fit the model"):
        build_model(ModelConfig(name="torchvision:resnet34", weights=str(tmp_path / "ckpt.safetensors")), 3)
    with pytest.raises(ModelError, match="not found"):
        build_model(ModelConfig(name="torchvision:resnet18", weights=str(tmp_path / "missing.pt")), 3)


def test_packaged_lite0_weights_classify_a_real_photo():
    """The package's tensors mapped onto timm's efficientnet_lite0 recognise sklearn's china.jpg."""
    from sklearn.datasets import load_sample_image
    from torchvision.models import ResNet18_Weights

    from ftdeploy.preprocessing import Preprocessing, preprocess

    built = build_model(ModelConfig(name="timm:efficientnet_lite0", weights=LITE0_PACKAGE), num_classes=None)
    d = built.defaults
    spec = Preprocessing(224, 224, 3, d["mean"], d["std"])
    x = torch.from_numpy(preprocess(Image.fromarray(load_sample_image("china.jpg")), spec))[None]
    with torch.no_grad():
        top5 = built.model.eval()(x).softmax(-1)[0].topk(5).indices.tolist()
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    names = [categories[i] for i in top5]
    buildings = {"bell cote", "palace", "church", "monastery", "dome", "boathouse", "pagoda", "castle"}
    assert names[0] in buildings and len(buildings & set(names)) >= 3, names
    with pytest.raises(ModelError, match="efficientnet_lite0 weights, not resnet18"):
        build_model(ModelConfig(name="timm:resnet18", weights=LITE0_PACKAGE), 2)
