"""PyTorch ResNets with MedicalNet's (3D) and torchvision's (2D) architecture, the reference that
tests/models/test_resnet3d.py compares jaxldm's Flax ResNets against. A module of its own so that
torch is imported only by the worker that runs those tests (importing it costs seconds)."""

import torch

tnn = torch.nn


def _conv(dims):
  return tnn.Conv3d if dims == 3 else tnn.Conv2d


def _bn(dims, c):
  return tnn.BatchNorm3d(c) if dims == 3 else tnn.BatchNorm2d(c)


class TorchBasic(tnn.Module):
  expansion = 1

  def __init__(self, dims, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    conv = _conv(dims)
    self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
    self.bn1 = _bn(dims, planes)
    self.conv2 = conv(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = _bn(dims, planes)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + residual)


class TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, dims, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    conv = _conv(dims)
    self.conv1 = conv(inplanes, planes, 1, bias=False)
    self.bn1 = _bn(dims, planes)
    self.conv2 = conv(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = _bn(dims, planes)
    self.conv3 = conv(planes, planes * 4, 1, bias=False)
    self.bn3 = _bn(dims, planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    residual = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + residual)


class ShortcutA(tnn.Module):
  """MedicalNet's downsample_basic_block: avg_pool(kernel 1, stride) then zero channels."""

  def __init__(self, planes, stride):
    super().__init__()
    self.planes, self.stride = planes, stride

  def forward(self, x):
    out = torch.nn.functional.avg_pool3d(x, kernel_size=1, stride=self.stride)
    zeros = torch.zeros((out.shape[0], self.planes - out.shape[1]) + tuple(out.shape[2:]))
    return torch.cat([out, zeros], dim=1)


class TorchResNet(tnn.Module):
  """MedicalNet's ResNet (dims=3, dilated, shortcut A/B, with its conv_seg head) or torchvision's
  (dims=2, strided, shortcut B, with its fc head), minus nothing the state dict would carry."""

  def __init__(self, block, layers, dims=3, shortcut="B", dilated=True, in_channels=1):
    super().__init__()
    conv = _conv(dims)
    self.dims, self.shortcut, self.inplanes = dims, shortcut, 64
    self.conv1 = conv(in_channels, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = _bn(dims, 64)
    self.maxpool = (tnn.MaxPool3d if dims == 3 else tnn.MaxPool2d)(3, stride=2, padding=1)
    plan = [(1, 1), (2, 1), (1, 2), (1, 4)] if dilated else [(1, 1), (2, 1), (2, 1), (2, 1)]
    for i, (planes, n, (stride, dilation)) in enumerate(zip((64, 128, 256, 512), layers, plan)):
      setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride, dilation))
    if dims == 3:  # MedicalNet's segmentation head: in the state dict, unused for features.
      self.conv_seg = tnn.Sequential(tnn.ConvTranspose3d(512 * block.expansion, 32, 2, stride=2),
                                     tnn.BatchNorm3d(32), tnn.ReLU(), tnn.Conv3d(32, 2, 1, bias=False))
    else:
      self.fc = tnn.Linear(512 * block.expansion, 10)

  def _make_layer(self, block, planes, blocks, stride, dilation):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      if self.shortcut == "A":
        downsample = ShortcutA(planes * block.expansion, stride)
      else:
        downsample = tnn.Sequential(_conv(self.dims)(self.inplanes, planes * block.expansion, 1, stride=stride,
                                                     bias=False), _bn(self.dims, planes * block.expansion))
    layers = [block(self.dims, self.inplanes, planes, stride, dilation, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.dims, self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
    return tnn.Sequential(*layers)

  def features(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return x.mean(dim=tuple(range(2, 2 + self.dims)))


def randomised(model, seed=0):
  """Random weights and random BatchNorm running statistics (a fresh BN is the identity)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (tnn.BatchNorm2d, tnn.BatchNorm3d)):
        c = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
  return model.eval()


def save_wrapped(model, path, *, data_parallel_prefix=True):
  """As MedicalNet ships its files: {"state_dict": ...} with DataParallel's `module.` prefix."""
  state = {("module." + k if data_parallel_prefix else k): v for k, v in model.state_dict().items()}
  torch.save({"epoch": 1, "state_dict": state}, path)
